"""The adapter spec as a typed record (issue 19): what is written, what old files read as, what is refused."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from matrix import MODELS, perturb
from torch import nn

import loraplex
from loraplex._version import __version__
from loraplex.files import tensor_digest
from loraplex.io import read_spec, spec_of
from loraplex.spec import AdapterSpec, SpecEntry

MLP = MODELS[0]  # fc1 (12 -> 20), fc2 (20 -> 18), classifier

# What loraplex wrote before the spec was a record (format_version 1), for nn.Sequential(nn.Linear(8, 8))
# with LoRA rank 2; only the version and the tensors' digest are filled in.
TINY = """{
  "format": "loraplex.adapter",
  "format_version": 1,
  "loraplex_version": "VERSION",
  "adapters": [
    {
      "name": "default",
      "method": "lora",
      "options": {
        "rank": 2,
        "alpha": 16.0,
        "dropout": 0.0,
        "rslora": false,
        "init": "kaiming"
      },
      "layers": [
        "0"
      ],
      "sizes": [
        [
          8,
          8
        ]
      ]
    }
  ],
  "train": [],
  "tensors_sha256": "DIGEST"
}
"""

LORA = {"rank": 2, "alpha": 16.0, "dropout": 0.0, "rslora": False, "init": "kaiming"}
LOHA = {"rank": 2, "alpha": 8.0, "rank_dropout": 0.0, "module_dropout": 0.0, "init": "zeros"}
# A v1 spec as loraplex writes it for two named adapters and a trained head (no digest: read unchecked).
MULTI: dict[str, Any] = {
    "format": "loraplex.adapter",
    "format_version": 1,
    "loraplex_version": "0.1.0",
    "adapters": [
        {"name": "a", "method": "lora", "options": LORA, "layers": ["fc1", "fc2"], "sizes": [[12, 20], [20, 18]]},
        {"name": "b", "method": "loha", "options": LOHA, "layers": ["fc2"], "sizes": [[20, 18]]},
    ],
    "train": ["classifier"],
}


def multi() -> nn.Module:
    model = loraplex.adapt(MLP.make(), "lora", name="a", rank=2, targets=["fc1", "fc2"], train=["classifier"])
    loraplex.adapt(model, "loha", name="b", rank=2, targets=["fc2"])
    perturb(model)
    return model


def test_the_written_json_is_the_v1_text(tmp_path: Path) -> None:
    d = loraplex.save(loraplex.adapt(nn.Sequential(nn.Linear(8, 8)), "lora", rank=2), tmp_path)
    digest = tensor_digest(d / "adapter.safetensors")
    assert digest is not None
    text = TINY.replace("VERSION", __version__).replace("DIGEST", digest)
    assert (d / "adapter.json").read_text() == text
    spec = read_spec(d)
    assert spec == AdapterSpec((SpecEntry("lora", ("0",), LORA, "default", ((8, 8),)),), (), __version__, digest, 1)
    assert json.dumps(spec.to_json(), indent=2) + "\n" == text  # read and written back: the same bytes


def test_the_spec_of_several_names_and_a_trained_head(tmp_path: Path) -> None:
    model = multi()
    spec = spec_of(model)
    assert spec.to_json() == MULTI | {"loraplex_version": __version__}
    assert list(spec.to_json()) == ["format", "format_version", "loraplex_version", "adapters", "train"]
    assert [list(e) for e in spec.to_json()["adapters"]] == [["name", "method", "options", "layers", "sizes"]] * 2
    assert spec.names() == ["a", "b"] and spec.train == ("classifier",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train = ()  # type: ignore[misc]
    loraplex.save(model, tmp_path / "b", name="b")
    only_b = read_spec(tmp_path / "b")
    assert [e.name for e in only_b.adapters] == ["b"] and only_b.train == ()


def test_a_hand_written_v1_spec_loads(tmp_path: Path) -> None:
    """Files saved before the record (literal v1 JSON), and v1 files with every optional field left out."""
    model = multi()
    loraplex.save(model, tmp_path)
    x = MLP.input()
    for spec in (
        MULTI,
        {  # the optional fields left out: name, options and sizes of an entry, loraplex_version
            "format": "loraplex.adapter",
            "format_version": 1,
            "adapters": [
                {"name": "a", "method": "lora", "options": {"rank": 2}, "layers": ["fc1", "fc2"]},
                {"name": "b", "method": "loha", "options": {"rank": 2}, "layers": ["fc2"]},
            ],
            "train": ["classifier"],
        },
    ):
        (tmp_path / "adapter.json").write_text(json.dumps(spec, indent=2))
        assert read_spec(tmp_path).to_json() == spec  # read and written back: what the file says
        loaded = loraplex.load(MLP.make(), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))
    (tmp_path / "adapter.json").write_text(json.dumps({"format": "loraplex.adapter", "format_version": 1}))
    assert read_spec(tmp_path) == AdapterSpec()  # no adapter, no train, no version, no digest


def _entry(**kw: Any) -> dict[str, Any]:
    return {"name": "a", "method": "lora", "options": {"rank": 2}, "layers": ["fc1"], "sizes": [[12, 20]]} | kw


BAD: list[tuple[dict[str, Any], str]] = [
    ({"format": "peft"}, r"is not an adapter spec of loraplex \(format must be 'loraplex.adapter'\)"),
    ({"format_version": 0}, "format_version=0 must be a positive integer"),
    ({"format_version": 2}, r"format_version=2 is newer than this loraplex reads \(1\)"),
    ({"adapters": {"a": 1}}, "adapters must be a list"),
    ({"adapters": ["lora"]}, "each adapter entry must be an object, not 'lora'"),
    ({"adapters": [_entry(method="nope")]}, "method='nope' is not one of the registered methods: lora, "),
    ({"adapters": [_entry(name=3)]}, "name must be a string, not 3"),
    ({"adapters": [_entry(options=[2])]}, r"options must be an object, not \[2\]"),
    (
        {"adapters": [_entry(options={"rank": 2, "rnk": 3})]},
        r"adapter 'a' has options \['rnk'\] that method 'lora' does not declare; its options are: rank, alpha",
    ),
    ({"adapters": [_entry(layers="fc1")]}, "adapter 'a': layers must be a list of strings, not 'fc1'"),
    ({"adapters": [_entry(layers=[1])]}, "adapter 'a': layers must be a list of strings"),
    ({"adapters": [_entry(sizes=[[12, 20], [1, 1]])]}, r"sizes must list \[in_features, out_features\] \(two integ"),
    ({"adapters": [_entry(sizes=[[12]])]}, "for each of its 1 layers, not"),
    ({"adapters": [_entry(sizes=[[12, True]])]}, r"adapter 'a': sizes must list"),
    ({"adapters": [_entry(sizes=[["12", 20]])]}, r"adapter 'a': sizes must list"),
    ({"train": "classifier"}, "train must be a list of strings, not 'classifier'"),
    ({"tensors_sha256": None}, "tensors_sha256 must be a string, not None"),
    ({"tensors_sha256": 5}, "tensors_sha256 must be a string, not 5"),
    ({"loraplex_version": 1}, "loraplex_version must be a string, not 1"),
]


@pytest.mark.parametrize(("edit", "message"), BAD)
def test_each_constraint_is_refused_naming_the_file(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    model = MLP.make()
    loraplex.save(loraplex.adapt(MLP.make(), "lora", name="a", rank=2, targets=["fc1"]), tmp_path)
    (tmp_path / "adapter.json").write_text(json.dumps(json.loads((tmp_path / "adapter.json").read_text()) | edit))
    path = re.escape(str(tmp_path / "adapter.json"))
    with pytest.raises(ValueError, match=f"^{path}:? .*{message}"):
        loraplex.load(model, tmp_path)
    assert not loraplex.adapters(model)
    with pytest.raises(ValueError, match=message):
        AdapterSpec.from_json(json.loads((tmp_path / "adapter.json").read_text()), tmp_path / "adapter.json")


def test_unknown_keys_warn_and_are_dropped(tmp_path: Path) -> None:
    where = tmp_path / "adapter.json"
    obj = MULTI | {"zz": 1, "adapters": [MULTI["adapters"][0] | {"yy": 2}]}
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['yy'\] in an adapter entry"):
        with pytest.warns(UserWarning, match=r"ignoring unknown keys \['zz'\]"):
            spec = AdapterSpec.from_json(obj, where)
    assert spec.to_json() == MULTI | {"adapters": MULTI["adapters"][:1]}


# compression.json, the same treatment: a literal v1 file (as loraplex writes it, without the digest) loads.
COMPRESSED: dict[str, Any] = {
    "format": "loraplex-compressed",
    "format_version": 1,
    "model_class": "Sequential",
    "dtype": "float32",
    "layers": {
        "0": {"kind": "lowrank", "in": 24, "out": 40, "rank": 2, "bias": True},
        "2": {"kind": "lowrank", "in": 40, "out": 32, "rank": 2, "bias": False},
    },
}


def test_a_hand_written_v1_compression_spec_loads_and_constraints_name_the_file(tmp_path: Path) -> None:
    from loraplex.compression.io import CompressionSpec, load_compressed, save_compressed
    from loraplex.compression.lord import compress

    def base() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 32, bias=False))

    model = compress(base(), rank=2)
    save_compressed(model, tmp_path)
    where = tmp_path / "compression.json"
    written = json.loads(where.read_text())
    assert list(written) == [*COMPRESSED, "tensors_sha256"] and isinstance(written.pop("tensors_sha256"), str)
    assert written == COMPRESSED
    where.write_text(json.dumps(COMPRESSED, indent=2))
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path, base())(x), model(x), rtol=0, atol=0)
    assert CompressionSpec.from_json(COMPRESSED, where).to_json() == COMPRESSED
    bad_layer = {"0": COMPRESSED["layers"]["0"] | {"rank": True}}
    for edit, message in [
        ({"dtype": "Tensor"}, "dtype='Tensor' is not a torch dtype"),
        ({"model_class": 3}, "'model_class' and 'dtype' must be strings"),
        ({"layers": bad_layer}, "layer '0' has a malformed entry"),
        ({"tensors_sha256": None}, "tensors_sha256 must be a string"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(str(where))}: {message}"):
            CompressionSpec.from_json(COMPRESSED | edit, where)
