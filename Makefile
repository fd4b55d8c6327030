# Two commands do everything on a fresh machine: `make demo` and `make test`.
# VENV can point at a cached environment shared by many checkouts (see .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.maskray-deps-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_DATA := data/demo
DEMO_CONFIG := configs/demo/mae.yaml
DTM_TEACHER := runs/teachers/mae_demo.safetensors

.PHONY: install demo demo-data demo-job demo-teacher demo-dtm demo-beitv2 test lint clean gpu-wheels

$(DEPS_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev,peers,onnx,clip,s3,video]"
	touch $@

# Dependencies once per pyproject change; the editable install is re-pointed at this checkout every time.
install: $(DEPS_STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

$(DEMO_DATA)/train/manifest.parquet:
	$(PY) launch/make_shards.py demo $(DEMO_DATA) --overwrite

demo-data: install $(DEMO_DATA)/train/manifest.parquet

demo: demo-data
	$(PY) launch/pretrain.py --config $(DEMO_CONFIG)

# DTM's demo teacher (configs/demo/dtm.yaml): the MAE demo's final encoder, exported. The run's id is the last
# line pretraining prints (mlflow_run_id=...); no such line means the run failed.
$(DTM_TEACHER):
	mkdir -p $(dir $@)
	$(PY) launch/pretrain.py --config $(DEMO_CONFIG) --run-name mae-demo-teacher 2>&1 | tee $(@:.safetensors=.log)
	id=$$(sed -n 's/^mlflow_run_id=//p' $(@:.safetensors=.log) | tail -1); test -n "$$id" && \
		$(PY) launch/export.py --run-id $$id --out $@

demo-teacher: demo-data $(DTM_TEACHER)

demo-dtm: demo-teacher
	$(PY) launch/pretrain.py --config configs/demo/dtm.yaml

# BEiT v2's two stages on the demo: the VQ-KD tokenizer (configs/demo/vqkd.yaml) distilled from the same exported
# MAE teacher, then BEiT v2 (configs/demo/beitv2.yaml) with the tokenizer that run keeps, found by its run id.
VQKD_LOG := runs/tokenizers/vqkd-demo.log
demo-beitv2: demo-teacher
	mkdir -p $(dir $(VQKD_LOG))
	$(PY) launch/pretrain.py --config configs/demo/vqkd.yaml --set objective.teacher.path=$(DTM_TEACHER) \
		2>&1 | tee $(VQKD_LOG)
	id=$$(sed -n 's/^mlflow_run_id=//p' $(VQKD_LOG) | tail -1); test -n "$$id" && \
		$(PY) launch/pretrain.py --config configs/demo/beitv2.yaml --set objective.tokenizer.run_id=$$id

# The same demo as a Ray job on a local cluster (`$(VENV)/bin/ray start --head` first): the job runs this venv's
# Python and keeps data and tracking in this checkout. Ray >= 2.60 clusters use token auth by default.
demo-job: demo-data
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-token} $(VENV)/bin/ray job submit --working-dir . --runtime-env-json \
		'{"excludes": [".git", ".venv", "data", "runs", "mlartifacts"], "env_vars": {"MASKRAY_ROOT": "$(CURDIR)"}}' \
		-- $(abspath $(PY)) launch/pretrain.py --config $(DEMO_CONFIG) $(ARGS)

# two processes: the Ray and slow tests in order in one, the rest beside them (tests/conftest.py)
test: install
	$(PY) -m pytest -q -n 2 --dist loadgroup

# .whl/: the wheels the GPU suite (benchmarks/gpu/run.sh) needs and the GPU machine lacks, cp312 manylinux x86-64, at
# this venv's versions (CONTRIBUTING.md: running the GPU suite). An existing venv is only read, never reinstalled.
gpu-wheels:
	test -x $(PY) || $(MAKE) install
	PY=$(PY) bash benchmarks/gpu/wheels.sh

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_DATA) runs mlflow.db mlartifacts
