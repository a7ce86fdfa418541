"""An emulator of the Kubernetes API for tests (see /work/shared/KUBE-TESTING.md)."""
