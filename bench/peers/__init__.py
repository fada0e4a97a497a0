"""Other control planes on the benchmark's harness (bench/harness.py), for bench/suite.py:
`envoy` (Meshline and sovereign to one real Envoy, P8/P9), `gcp` (go-control-plane on the
same simulated proxies as Meshline; the Go program is in go-control-plane/)."""
