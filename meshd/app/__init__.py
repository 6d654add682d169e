"""The application library: the typed control client (:mod:`.client`) and the streaming API
over channels (:mod:`.streams`, re-exported by :mod:`meshd`)."""
