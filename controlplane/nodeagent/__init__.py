"""Sidecarless node agents: where each ambient pod's network namespace is.

- `registry` (control plane): the `NodeAgent.Report` gRPC service (protos/meshline/nodeagent/v1)
  and a Source turning each node's report into `PodNetns` objects;
- `agent` (`meshline node-agent`, one per node): finds each local ambient pod's network
  namespace, bind-mounts it under a path, applies the in-pod capture rules and reports.
"""
