"""Pure trust: site keys and ids (:mod:`.identity`), signed records (:mod:`.records`), who is a
member (:mod:`.rules`), invitation tokens (:mod:`.tokens`) and their base32 (:mod:`.base32`)."""
