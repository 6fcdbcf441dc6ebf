"""Tools around the library: synthetic models (``synth``), the checks against gguf-py
(``verify``), the fuzzer, the demo and the benchmarks. Each is a module of its own; nothing is
imported here."""
