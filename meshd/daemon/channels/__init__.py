"""Channels in the daemon (glue around the pure :mod:`meshd.channel` cores); :mod:`.service`
builds the parts and is what the daemon calls."""
