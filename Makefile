# Every target makes the virtual environment first when it is missing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?=
DEMO_OUT ?= work/demo

.PHONY: venv demo test test-fast pipeline serve stop clean distclean image-test fleet fleet-test

venv: $(VENV)/.installed

# Debian's chromium for the search page's browser tests (Playwright drives it; it downloads no browser) and nginx,
# the fleet's entry point (tests/test_deploy.py runs it as each pod does); the service the package starts is stopped.
$(VENV)/.installed: pyproject.toml
	test -x /usr/bin/chromium -a -x /usr/sbin/nginx || { apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium nginx && { service nginx stop || true; }; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[train,scale,test]'
	touch $@

demo: venv
	$(PY) -m scripts.demo --out $(DEMO_OUT) $(if $(DATA),--data $(DATA)) $(ARGS)

# Every tier: unit, in-process handler, real TorchServe, Ray, training (CI runs this). Two workers, each taking
# whole test modules in the order tests/conftest.py gives (the longest first; not xdist's most-tests-first):
# much of a test's time is spent waiting on a server, a subprocess or Ray.
test: venv
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# The inner loop: no TorchServe, no Ray, no training run.
test-fast: venv
	$(PY) -m pytest -m "not server and not slow"

pipeline: venv
	$(PY) -m training.pipeline $(ARGS)

serve: venv
	$(PY) -m scripts.serve start $(ARGS)

stop: venv
	$(PY) -m scripts.serve stop

# What the demo and the tests made; a user's runs (work/), archives (model_store/) and server (logs/) stay.
clean:
	if [ -x $(PY) ] && [ -d $(DEMO_OUT)/logs ]; then $(PY) -m scripts.serve stop --workdir $(DEMO_OUT)/logs; fi
	rm -rf $(DEMO_OUT) work/image-test .pytest_cache

distclean: clean
	@echo "distclean: deleting every training run (work/), archive (model_store/*.mar) and server log and key (logs/)"
	if [ -x $(PY) ]; then $(PY) -m scripts.serve stop; fi
	rm -rf work logs model_store/*.mar

# Build the Docker image (buildah, no Docker engine needed; root) and check it in a running container.
image-test: venv
	bash scripts/image-test.sh

# The local fleet (scripts/fleet.py): replicas of the image (built or brought up to date first) behind one address.
fleet: venv
	bash scripts/image-test.sh build
	$(PY) -m scripts.fleet up --store model_store $(ARGS)

# The local fleet's tests (tests/test_fleet.py): releases, a killed replica, the live catalogue, through the image.
fleet-test: venv
	bash scripts/image-test.sh build
	$(PY) -m pytest -m fleet tests/test_fleet.py
