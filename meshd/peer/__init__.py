"""The peer port: the one public port and its multiplexer (:mod:`.portmux`), the CURVE ROUTER
behind it (:mod:`.server`), outbound links (:mod:`.dialer`), the peer message codec
(:mod:`.wire`) and the flow-controlled byte splice (:mod:`.splice`)."""
