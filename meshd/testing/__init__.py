"""Support for tests, benchmarks and the demo: a deterministic network of real SWIM cores
(:mod:`.sim`) and real daemons as processes with waits on a condition (:mod:`.processes`)."""
