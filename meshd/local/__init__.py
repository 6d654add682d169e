"""The contract between a daemon and the applications of its site: the control routes and their
JSON shapes (:mod:`.api`), the frames on a channel's ipc socket (:mod:`.ipc`) and the
shared-memory ring for big batches (:mod:`.ring`)."""
