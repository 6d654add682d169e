"""A site's stored state: the key holder and site creation (:mod:`.site`), the verified mesh view
(:mod:`.view`), admissions (:mod:`.admission`), the SQLite store (:mod:`.store`), the config
(:mod:`.config`), the state directory (:mod:`.home`) and the join throttle (:mod:`.throttle`)."""
