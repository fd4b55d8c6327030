"""Nothing from outside the run executes code: ``pipe:`` shard URLs are refused, shards' pickles are never
unpickled, weights load weights-only, checkpoints others can write are refused, and credentials never reach the
logged params or tags."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import png_bytes
from mlflow.tracking import MlflowClient

from maskray import storage
from maskray.checkpoint import refuse_writable_by_others
from maskray.config import load_config
from maskray.data import ImageTransform, Sample, Views, build_loader, resolve_shards, write_shards
from maskray.engine.training_state import load_training_state
from maskray.errors import ConfigError, DataError
from maskray.run_spec import build_run_spec
from maskray.tracking import find_or_create_run, redact_params
from maskray.tracking.redact import is_secret_name

REPO = Path(__file__).resolve().parents[1]
PIPE = "pipe:curl -s https://example.com/shard-{000000..000009}.tar"


@pytest.mark.parametrize("key", ["data.shards", "eval.train_shards", "eval.test_shards"])
def test_pipe_urls_are_refused_with_one_line_naming_them(key) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"{key}={PIPE}"])
    message = str(caught.value)
    assert "\n" not in message and f"key '{key}'" in message and f"'{PIPE}' is a shell command" in message
    with pytest.raises(DataError, match=re.escape(f"data.shards: '{PIPE}' is a shell command")):
        resolve_shards(PIPE)
    with pytest.raises(ValueError, match="is a shell command"):
        storage.absolute(" pipe:rm -rf /tmp/x")


class _Touch:
    """Unpickling this creates ``path``: the marker of code run by a pickle."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_members_of_a_shard_are_never_unpickled(tmp_path) -> None:
    import pickle

    marker = tmp_path / "pwned"
    shards = write_shards([Sample("s000", image=png_bytes(np.zeros((8, 8), np.uint8)), ext="png", label=0)],
                          tmp_path / "shards", samples_per_shard=1, progress=False)
    payload = pickle.dumps(_Touch(str(marker)))
    with tarfile.open(shards.urls[0], "a") as tar:
        for name in ("s000.pyd", "s000.pkl"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    batches = list(build_loader(shards, Views(image=ImageTransform(8, train=False)), batch_size=1, num_workers=0,
                                drop_last=False))
    assert not marker.exists()
    assert sum(len(batch["key"]) + batch["skipped"] for batch in batches) == 1


def test_code_loads_weights_only() -> None:
    """Every ``torch.load`` in the package, objectives and launchers passes ``weights_only=True``; nothing calls
    ``pickle.load(s)`` or ``np.load`` with pickles allowed."""
    offenders = []
    for path in [*REPO.glob("maskray/**/*.py"), *REPO.glob("objectives/*.py"), *REPO.glob("launch/*.py")]:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in
                      re.finditer(r"pickle\.loads?\(|allow_pickle=True|weights_only=False", text)]
    assert offenders == []


def test_checkpoints_that_others_can_write_are_refused(tmp_path) -> None:
    checkpoint = tmp_path / "checkpoint_000000"
    (checkpoint / "ds").mkdir(parents=True)
    (checkpoint / "ds" / "latest").write_text("step2")
    for path in (tmp_path, checkpoint, checkpoint / "ds"):
        path.chmod(0o755)
    (checkpoint / "ds" / "latest").chmod(0o644)
    refuse_writable_by_others(checkpoint)  # only its owner can write it: fine

    (checkpoint / "ds" / "latest").chmod(0o666)
    with pytest.raises(ConfigError) as caught:
        load_training_state(None, None, None, str(checkpoint), 0)  # refused before DeepSpeed is asked
    message = str(caught.value)
    assert "\n" not in message and f"'{checkpoint / 'ds' / 'latest'}' is writable by everyone (mode 666)" in message
    assert f"chmod -R go-w '{checkpoint}'" in message
    (checkpoint / "ds" / "latest").chmod(0o644)
    (checkpoint / "ds").chmod(0o775)
    with pytest.raises(ConfigError, match=re.escape(f"'{checkpoint / 'ds'}' is writable by its group (mode 775)")):
        refuse_writable_by_others(checkpoint)
    refuse_writable_by_others("s3://bucket/runs/x/checkpoint_000000")  # the bucket's policy decides


def test_secrets_from_the_environment_and_the_config_are_redacted_from_logged_params(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-s3cr3t-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-tok-abcdef")
    config = load_config(REPO / "configs/demo/mae.yaml", [
        "tracking.uri=https://alice:hunter2@mlflow.example.com:5000",
        "tracking.tags={api_token: tok-42, password: pw-42, note: 'copied aws-s3cr3t-0123456789 here', team: a}",
        "data.shards=s3://bucket/shards?token=mlflow-tok-abcdef",
    ])
    params = build_run_spec(config, check_data_too=False).params
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = find_or_create_run(uri, "redact", "r", params, config.run_tags())
    run = MlflowClient(uri).get_run(run_id)
    logged = {**run.data.params, **run.data.tags}
    text = repr(logged)
    for secret in ("hunter2", "tok-42", "pw-42", "aws-s3cr3t-0123456789", "mlflow-tok-abcdef"):
        assert secret not in text
    assert logged["tracking.uri"] == "https://alice:***@mlflow.example.com:5000"
    assert logged["tracking.tags.api_token"] == "***" and logged["tracking.tags.password"] == "***"
    assert logged["tracking.tags.note"] == "copied *** here" and logged["tracking.tags.team"] == "a"
    assert logged["data.shards"] == "s3://bucket/shards?token=***"
    assert logged["api_token"] == "***" and logged["dataset_path"] == "s3://bucket/shards?token=***"  # the tags
    assert redact_params({"optim.lr": 0.1, "objective.mask.key": "views.0"}, os.environ) == {
        "optim.lr": 0.1, "objective.mask.key": "views.0"}
    assert redact_params({"grid.objective.fail": "false,true"}, {"TOKENIZERS_PARALLELISM": "false"}) == {
        "grid.objective.fail": "false,true"}  # a tokenizer setting, not a token
    assert [is_secret_name(name) for name in ("GOOGLE_APPLICATION_CREDENTIALS", "x-api-key", "apiToken",
                                              "client_secrets", "TOKENIZERS_PARALLELISM", "monkey")] == [
        True, True, True, True, False, False]
