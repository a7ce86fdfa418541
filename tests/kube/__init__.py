"""The local Kubernetes the operator's tests run on: the real control plane built from
Kubernetes' Go modules (controlplane/, controlplane.py), certificates (pki.py), a pod network
(network.py) and a local kubelet that runs pods as processes (kubelet.py), assembled by
local.LocalCluster. See /work/shared/KUBE-TESTING.md."""
