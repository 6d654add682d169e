"""The daemon (asyncio glue): :mod:`.app` builds, starts and stops one service per module.

Services get narrow collaborators, never the daemon itself; protocol decisions live in the pure
cores (:mod:`meshd.swim`, :mod:`meshd.channel`, :mod:`meshd.trust`).  See docs/architecture.md.
"""
