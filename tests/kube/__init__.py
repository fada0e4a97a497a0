"""Test helpers for the Kubernetes source: the kmock emulator behind a fault proxy, a
kubeconfig for it, and object builders. See `tests.kube.emulator.kube_emulator`."""

from tests.kube.emulator import KubeEnv, kube_emulator, patch_namespace_paths, write_kubeconfig
from tests.kube.faults import FaultProxy

__all__ = ["FaultProxy", "KubeEnv", "kube_emulator", "patch_namespace_paths", "write_kubeconfig"]
