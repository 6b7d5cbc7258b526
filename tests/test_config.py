"""Unit tests of latentize.config and latentize.registry: loading, overrides, validation,
redaction and the config fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentize.config import (
    BucketGenerator,
    Config,
    config_from_dict,
    config_to_dict,
    fingerprint,
    load_config,
    redact,
)
from latentize.errors import ConfigError, LatentizeError
from latentize.registry import Registry

CONFIG_YAML = """\
input:
  urls: [a/00000.tar, a/00001.tar]
  format: webdataset
preprocess:
  resolution: 512
  crop: random
encoder:
  model: stabilityai/sd-vae-ft-mse
  batch_size: 8
  scaling_factor: 0.18215
output:
  path: out/latents
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def cfg(**sections: dict) -> Config:
    """A validated config from plain section data."""
    return load_config(base=sections)


# --- loading and overrides -------------------------------------------------------------------


def test_load_yaml_fills_defaults(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, CONFIG_YAML))
    assert c.input.urls == ["a/00000.tar", "a/00001.tar"]
    assert c.input.format == "webdataset"
    assert c.preprocess.resolution == 512 and c.preprocess.size == (512, 512)
    assert c.preprocess.crop == "random"
    assert c.encoder.batch_size == 8
    assert c.encoder.scaling_factor == pytest.approx(0.18215)
    assert c.output.path == "out/latents"
    # Untouched keys keep their defaults.
    assert c.encoder.sample == "mode"
    assert c.output.dtype == "float16"
    assert c.ray.actors == 1


def test_overrides_parse_like_yaml(tmp_path: Path) -> None:
    c = load_config(
        write(tmp_path, CONFIG_YAML),
        [
            "encoder.batch_size=64",  # int, not "64"
            "preprocess.resolution=[512,768]",  # list
            "encoder.scaling_factor=null",  # back to "take the model's"
            "encoder.shift_factor=1",  # int widened to float
            "output.storage_options.client_kwargs.endpoint_url=http://minio:9000",  # new nested keys
            "input.urls=s3://b/{00000..00009}.tar",
        ],
    )
    assert c.encoder.batch_size == 64 and isinstance(c.encoder.batch_size, int)
    assert c.preprocess.resolution == [512, 768]
    assert c.preprocess.size == (512, 768)
    assert c.encoder.scaling_factor is None
    assert c.encoder.shift_factor == 1.0 and isinstance(c.encoder.shift_factor, float)
    assert c.output.storage_options == {"client_kwargs": {"endpoint_url": "http://minio:9000"}}
    assert c.input.urls == "s3://b/{00000..00009}.tar"
    # Keys the overrides did not name are kept from the file.
    assert c.preprocess.crop == "random"
    assert c.output.path == "out/latents"


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(overrides=["encoder.batch_size"])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


# --- validation ------------------------------------------------------------------------------


def test_unknown_key_named_with_its_full_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^encoder\.batchsize: unknown key") as exc:
        load_config(write(tmp_path, "encoder:\n  batchsize: 8\n"))
    # The message lists the valid keys so the typo is fixed in one go.
    assert "batch_size" in str(exc.value)


def test_unknown_override_key_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^preprocess\.resolutoin: unknown key"):
        load_config(overrides=["preprocess.resolutoin=64"])


def test_unknown_section_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^encoders: unknown key"):
        cfg(encoders={"model": "x"})


@pytest.mark.parametrize(
    ("sections", "path"),
    [
        ({"encoder": {"batch_size": "x"}}, "encoder.batch_size"),
        ({"encoder": {"batch_size": 2.5}}, "encoder.batch_size"),
        ({"encoder": {"batch_size": True}}, "encoder.batch_size"),  # bool is not an int here
        ({"encoder": {"scaling_factor": "big"}}, "encoder.scaling_factor"),
        ({"preprocess": {"resolution": "512"}}, "preprocess.resolution"),
        ({"preprocess": {"resolution": [512, "x"]}}, "preprocess.resolution"),
        ({"input": {"storage_options": "anon"}}, "input.storage_options"),
        ({"encoder": "kl"}, "encoder"),
    ],
)
def test_wrong_type_rejected_naming_the_key(sections: dict, path: str) -> None:
    with pytest.raises(ConfigError) as exc:
        cfg(**sections)
    assert str(exc.value).startswith(path)


def test_wrong_type_from_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^encoder\.batch_size: expected int or null, got 'x'"):
        load_config(write(tmp_path, 'encoder:\n  batch_size: "x"\n'))


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("encoder.sample=foo", "encoder.sample"),
        ("encoder.type=vae", "encoder.type"),
        ("encoder.dtype=float64", "encoder.dtype"),
        ("output.format=zarr", "output.format"),
        ("output.dtype=int8", "output.dtype"),
        ("output.tensor_type=ndarray", "output.tensor_type"),
        ("preprocess.crop=left", "preprocess.crop"),
        ("input.format=csv", "input.format"),
    ],
)
def test_choices_validated(override: str, path: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{path}: .* is not one of"):
        load_config(overrides=[override])


def test_choice_error_lists_valid_values() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(overrides=["encoder.sample=foo"])
    for valid in ("mode", "sample", "moments"):
        assert valid in str(exc.value)


def test_resolution_int_or_width_height() -> None:
    assert cfg(preprocess={"resolution": 64}).preprocess.size == (64, 64)
    assert cfg(preprocess={"resolution": [96, 64]}).preprocess.size == (96, 64)
    with pytest.raises(ConfigError, match="preprocess.resolution"):
        cfg(preprocess={"resolution": [64, 64, 3]})
    with pytest.raises(ConfigError, match="preprocess.resolution"):
        cfg(preprocess={"resolution": 4})


@pytest.mark.parametrize("sample", ["moments", "sample"])
def test_vq_only_allows_mode(sample: str) -> None:
    with pytest.raises(ConfigError, match="encoder.sample"):
        cfg(encoder={"type": "vq", "sample": sample})
    assert cfg(encoder={"type": "vq", "sample": "mode"}).encoder.type == "vq"


def test_bounds_checked() -> None:
    with pytest.raises(ConfigError, match="encoder.batch_size"):
        cfg(encoder={"batch_size": 0})
    with pytest.raises(ConfigError, match="ray.actors"):
        cfg(ray={"actors": 0})


def test_config_errors_are_latentize_errors() -> None:
    # The CLI catches LatentizeError to print a one-line message instead of a traceback.
    assert issubclass(ConfigError, LatentizeError)


# --- redaction -------------------------------------------------------------------------------


def test_redact_hides_nested_secrets_but_keeps_the_rest() -> None:
    c = cfg(
        input={
            "urls": "s3://bucket/{00000..00001}.tar",
            "storage_options": {
                "key": "AKIAEXAMPLE",
                "secret": "wJalrXUtnFEMI",
                "token": "FQoGZXIvYXdz",
                "anon": False,
                "client_kwargs": {
                    "endpoint_url": "http://minio:9000",
                    "aws_session_token": "sess-123",
                },
            },
        },
        output={
            "path": "gs://bucket/out",
            "storage_options": {"token": "/secret/sa.json", "project": "my-project"},
        },
    )
    original = config_to_dict(c)
    red = redact(original)
    so = red["input"]["storage_options"]
    assert so["key"] == so["secret"] == so["token"] == "***"
    assert so["client_kwargs"]["aws_session_token"] == "***"
    assert so["client_kwargs"]["endpoint_url"] == "http://minio:9000"
    assert so["anon"] is False
    assert red["output"]["storage_options"] == {"token": "***", "project": "my-project"}
    assert red["output"]["path"] == "gs://bucket/out"
    # No secret survives anywhere in the text that goes into the manifest.
    text = repr(red)
    for secret in ("AKIAEXAMPLE", "wJalrXUtnFEMI", "FQoGZXIvYXdz", "sess-123", "/secret/sa.json"):
        assert secret not in text
    # redact copies: the config itself still carries the credentials.
    assert original["input"]["storage_options"]["key"] == "AKIAEXAMPLE"


def test_redact_keeps_config_fields_that_only_look_secret() -> None:
    # `input.key_field` names the Parquet column holding sample keys; it is no credential, and
    # the manifest's resolved config must still say which column was used.
    red = redact(config_to_dict(cfg(input={"key_field": "sample_id"})))
    assert red["input"]["key_field"] == "sample_id"
    assert red["encoder"] == config_to_dict(cfg())["encoder"]


def test_redact_keeps_nulls_and_lists() -> None:
    assert redact({"token": None, "urls": [{"secret": "x"}, "plain"]}) == {
        "token": None,
        "urls": [{"secret": "***"}, "plain"],
    }


# --- fingerprint -----------------------------------------------------------------------------

BASE = {
    "input": {"urls": ["s3://b/00000.tar"], "format": "webdataset"},
    "preprocess": {"resolution": 64},
    "encoder": {"model": "/models/vae"},
    "output": {"path": "/data/out"},
}


def fp(*overrides: str) -> str:
    return fingerprint(load_config(base=BASE, overrides=list(overrides)))


def test_fingerprint_is_stable() -> None:
    assert fp() == fp()
    assert len(fp()) == 16


@pytest.mark.parametrize(
    "override",
    [
        "output.path=/elsewhere/out",
        "output.storage_options.key=AKIA",
        "input.storage_options.secret=xyz",
        "input.rows_per_block=7",
        "encoder.batch_size=3",
        "encoder.device=cpu",
        "ray.actors=8",
        "ray.gpus_per_actor=0.5",
        "ray.address=ray://head:10001",
        "ray.commit_parallelism=16",
    ],
)
def test_fingerprint_ignores_paths_credentials_and_sizing(override: str) -> None:
    assert fp(override) == fp()


@pytest.mark.parametrize(
    "override",
    [
        "encoder.model=/models/other-vae",
        "encoder.sample=sample",
        "encoder.seed=1",
        "encoder.scaling_factor=0.13025",
        "encoder.shift_factor=0.1",
        "encoder.type=vq",
        "encoder.dtype=bfloat16",
        "preprocess.resolution=128",
        "preprocess.resolution=[64,128]",
        "preprocess.crop=random",
        "output.dtype=float32",
        "output.format=webdataset",
        "output.tensor_type=list",
        "input.image_field=png",
    ],
)
def test_fingerprint_changes_with_what_changes_the_bytes(override: str) -> None:
    assert fp(override) != fp()


def test_fingerprint_depends_on_the_input_urls() -> None:
    # Shard ids (and so the commit markers a rerun trusts) are derived from the URL list, so a
    # root written from other inputs is not resumable: the URLs belong to the run's identity.
    assert fp("input.urls=[s3://other/00000.tar]") != fp()


# --- registry --------------------------------------------------------------------------------


def test_registry_unknown_name_lists_valid_names() -> None:
    reg: Registry[int] = Registry("output format", config_key="output.format")
    reg.add("parquet", 1)
    reg.add("webdataset", 2)
    assert reg.get("parquet") == 1
    assert "webdataset" in reg and reg.names() == ["parquet", "webdataset"]
    with pytest.raises(ConfigError) as exc:
        reg.get("zarr")
    msg = str(exc.value)
    assert "'zarr'" in msg and "output.format" in msg
    assert "parquet, webdataset" in msg


def test_registry_rejects_duplicate_names() -> None:
    reg: Registry[int] = Registry("thing", config_key="x.y")
    reg.add("a", 1)
    with pytest.raises(ValueError, match="twice"):
        reg.add("a", 2)


def test_real_registries_know_their_components() -> None:
    from latentize.encoders import ENCODERS
    from latentize.sinks import SINKS

    assert ENCODERS.names() == [
        "chameleon",
        "dc",
        "emu3",
        "flux2",
        "hunyuanimage",
        "janus",
        "kl",
        "qwenimage",
        "tiny",
        "vq",
        "wan",
    ]
    # config.py validates encoder.type without importing torch; its list must be the registry's.
    from latentize.config import _CHOICES

    assert sorted(c for c in _CHOICES["encoder.type"] if c) == ENCODERS.names()
    assert SINKS.names() == ["parquet", "webdataset"]
    with pytest.raises(ConfigError, match="dc, emu3, flux2, hunyuanimage, janus, kl, qwenimage, tiny, vq, wan"):
        ENCODERS.get("dcae")


def test_every_shipped_config_loads() -> None:
    """configs/*.yaml are documentation users copy: each must validate as written."""
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "demo.yaml",
        "laion-sd15-256.yaml",
        "sdxl-512.yaml",
        "vqgan-f16-256.yaml",
        "sdxl-buckets-1024.yaml",
        "multires-256-512.yaml",
        "laion-flux1-512-text.yaml",
    }
    for path in paths:
        cfg = load_config(path)
        assert cfg.encoder.type and cfg.encoder.model and cfg.output.path, path.name
    text = load_config(root / "laion-flux1-512-text.yaml").text
    assert text is not None and (text.preset, text.storage, text.model) == (
        "flux1",
        "padded",
        "black-forest-labs/FLUX.1-schnell",
    )


# --- sizes: resolution, resolutions, buckets ---------------------------------------------------


def test_resolution_defaults_to_256_and_the_resolved_config_shows_it() -> None:
    cfg = load_config(base={"output": {"path": "x"}})
    assert cfg.preprocess.resolution == 256 and cfg.preprocess.targets == [(256, 256)]
    assert cfg.preprocess.size == (256, 256) and cfg.preprocess.fixed_size


def test_resolutions_exclude_resolution_with_a_clear_message() -> None:
    both = {"output": {"path": "x"}, "preprocess": {"resolution": 256, "resolutions": [256, 512]}}
    with pytest.raises(ConfigError, match=r"^preprocess\.resolutions: give either preprocess\.resolution"):
        load_config(base=both)
    cfg = load_config(base={"output": {"path": "x"}, "preprocess": {"resolutions": [256, [768, 512]]}})
    assert cfg.preprocess.targets == [(256, 256), (768, 512)] and not cfg.preprocess.fixed_size
    with pytest.raises(ConfigError, match="no single size"):
        cfg.preprocess.size  # noqa: B018 - the property raises


def test_buckets_as_a_list_or_a_generator() -> None:
    listed = load_config(base={"output": {"path": "x"}, "preprocess": {"buckets": [[1024, 1024], [1152, 896]]}})
    assert listed.preprocess.buckets == [[1024, 1024], [1152, 896]] and listed.preprocess.resolution is None
    made = load_config(
        base={"output": {"path": "x"}, "preprocess": {"buckets": {"area": 1048576, "step": 64}, "flip": True}}
    )
    assert made.preprocess.buckets == BucketGenerator(area=1048576, step=64, min_ratio=0.25, max_ratio=4.0)
    # The config round-trips through plain data (manifest, Ray actors), null buckets too.
    assert config_from_dict(config_to_dict(made)).preprocess.buckets == made.preprocess.buckets
    plain = load_config(base={"output": {"path": "x"}})
    assert config_from_dict(config_to_dict(plain)) == plain
    with pytest.raises(ConfigError, match=r"^preprocess\.buckets: missing key\(s\): area"):
        load_config(base={"output": {"path": "x"}, "preprocess": {"buckets": {"step": 64}}})
    with pytest.raises(ConfigError, match=r"^preprocess\.buckets: the buckets give the sizes"):
        load_config(base={"output": {"path": "x"}, "preprocess": {"resolution": 512, "buckets": [[512, 512]]}})
    with pytest.raises(ConfigError, match=r"^preprocess\.buckets\.ares: unknown key"):
        load_config(base={"output": {"path": "x"}, "preprocess": {"buckets": {"ares": 1}}})
    with pytest.raises(ConfigError, match=r"^preprocess\.buckets: \[1024\] is not a \[width, height\]"):
        load_config(base={"output": {"path": "x"}, "preprocess": {"buckets": [[1024]]}})
