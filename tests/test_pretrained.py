"""Pretrained trunks for the `resnet{18,50,101}_<block>` variants: mirrored timm tags, the loading rule
(every trunk tensor loads, only the blocks keep their init), identity at init, smp "tu-" encoders, and the
"no published weights" error of the other models. Offline: checkpoints are random base models saved in
tmp_path; the hub route uses a hand-made Hugging Face cache in offline mode."""
import logging
import re
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
from torch import nn

import lit_attn
from lit_attn.models import lit_resnet
from lit_attn.models.pretrained import NoPublishedWeightsError, PretrainedLoadError, block_is_identity_at_init

BASES = tuple(lit_resnet.BASES)
PLUGINS = lit_attn.list_attn(kind=("gate", "global"), source="lit_attn")
R18 = [f"resnet18_{p}" for p in PLUGINS]
LOGGER = "lit_attn.models.pretrained"


def _random_base(name: str, seed: int, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """A base model's state dict with every tensor informative: timm zero-inits each residual branch's
    last BN, which would hide a gate placed there, so all BN affine params and statistics are random."""
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(name) if model is None else model
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(100)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _base_logits(name: str, sd: dict, x: torch.Tensor) -> torch.Tensor:
    base = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))  # timm's own load
    return _logits(base, x)


def _split(model: nn.Module) -> tuple[list[str], list[str]]:
    """(trunk keys, keys of the attention blocks) of a variant's state dict."""
    prefixes = tuple(p + "." for p in model.attention_blocks())
    keys = list(model.state_dict())
    return [k for k in keys if not k.startswith(prefixes)], [k for k in keys if k.startswith(prefixes)]


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
    """One random resnet18 checkpoint for the module, as .pth and .safetensors, and its logits."""
    folder = tmp_path_factory.mktemp("r18")
    sd = _random_base("resnet18", seed=1)
    torch.save(sd, folder / "resnet18.pth")
    safetensors.torch.save_file(sd, str(folder / "resnet18.safetensors"))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return {"sd": sd, "pth": str(folder / "resnet18.pth"), "safetensors": str(folder / "resnet18.safetensors"),
            "x": x, "logits": _base_logits("resnet18", sd, x)}


# --- mirrored tags --------------------------------------------------------------------------------------

def test_list_pretrained_mirrors_the_base_tags():
    base = timm.list_pretrained("resnet50.*")
    assert len(base) >= 10 and "resnet50.a1_in1k" in base and "resnet50.tv_in1k" in base
    mirrored = [n.replace("resnet50.", "resnet50_nonlocal.") for n in base]
    assert timm.list_pretrained("resnet50_nonlocal.*") == mirrored
    assert set(timm.list_pretrained("resnet50_nonlocal*")) >= set(mirrored)  # (+ nonlocal_concat, _dot, ...)
    assert set(timm.list_models("resnet50_*")) >= {f"resnet50_{p}" for p in PLUGINS}
    assert lit_resnet.SKIPPED_TAGS == {}  # timm 1.0.31: every resnet tag is a native fc/conv1 checkpoint
    assert timm.models.get_pretrained_cfg("resnet50_nonlocal.a1_in1k").hf_hub_id == "timm/resnet50.a1_in1k"


@pytest.mark.parametrize("base", BASES)
def test_every_variant_has_the_base_cfgs(base):
    base_cfgs = timm.models.get_arch_pretrained_cfgs(base)
    default = timm.models.get_pretrained_cfg(base)
    for plugin in PLUGINS:
        variant = f"{base}_{plugin}"
        cfgs = timm.models.get_arch_pretrained_cfgs(variant)
        assert list(cfgs) == [n.replace(f"{base}.", f"{variant}.") for n in base_cfgs]  # same tags, same order
        assert timm.models.get_pretrained_cfg(variant).tag == default.tag  # pretrained=True: the base's default
        for name, cfg in base_cfgs.items():
            mine = cfgs[name.replace(f"{base}.", f"{variant}.")]
            assert mine.hf_hub_id == cfg.hf_hub_id and variant not in mine.hf_hub_id  # the BASE checkpoint
            assert mine.architecture == variant and mine.tag == cfg.tag
            same = ("url", "num_classes", "mean", "std", "input_size", "test_input_size", "crop_pct",
                    "test_crop_pct", "interpolation", "license", "first_conv", "classifier", "pool_size")
            assert {k: getattr(mine, k) for k in same} == {k: getattr(cfg, k) for k in same}
            assert mine.notes[:len(cfg.notes or ())] == tuple(cfg.notes or ())


# --- identity at init -----------------------------------------------------------------------------------

def test_identity_at_init_is_what_the_blocks_do():
    """Each block run at its default init on a random input: out == x exactly, or not; the recorded set
    (cfg notes, docstrings, IDENTITY_AT_INIT) must agree with every block."""
    measured = {p for p in PLUGINS if block_is_identity_at_init(p)}
    assert set(lit_resnet._DECLARED_IDENTITY) == set(PLUGINS), "declare new blocks in lit_resnet._DECLARED_IDENTITY"
    assert lit_resnet.IDENTITY_AT_INIT == measured
    for plugin in PLUGINS:
        identity = plugin in measured
        for base in BASES:
            variant = f"{base}_{plugin}"
            assert lit_resnet.identity_at_init(variant) is identity
            assert lit_resnet.identity_at_init(f"{variant}.tv_in1k") is identity
            notes = " ".join(timm.models.get_pretrained_cfg(variant).notes)
            doc = timm.models.model_entrypoint(variant).__doc__
            for text in (notes, doc):
                assert ("NOT the identity" in text) is not identity and "identity" in text


# --- the loading rule, every resnet18 variant -----------------------------------------------------------

# each variant once, the file formats alternating (timm reads both into the same state dict)
@pytest.mark.parametrize(("variant", "fmt"), [(v, ("pth", "safetensors")[i % 2]) for i, v in enumerate(R18)])
def test_resnet18_variant_loads_the_base_trunk(variant, fmt, r18, caplog):
    torch.manual_seed(3)
    fresh = timm.create_model(variant).state_dict()
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = timm.create_model(variant, pretrained=True, pretrained_cfg_overlay=dict(file=r18[fmt]))
    state = model.state_dict()
    trunk, blocks = _split(model)
    assert set(trunk) == set(r18["sd"])  # the trunk is exactly the base architecture
    assert all(torch.equal(state[k], r18["sd"][k]) for k in trunk)
    assert blocks and all(torch.equal(state[k], fresh[k]) for k in blocks)  # blocks keep their init
    assert (f"{variant}: loaded {len(trunk)} trunk tensors from {r18[fmt]}; {len(blocks)} tensors of the "
            f"{variant.split('_', 1)[1]} blocks keep their init") in caplog.messages
    logits = _logits(model, r18["x"])
    if lit_resnet.identity_at_init(variant):
        assert torch.equal(logits, r18["logits"])
    else:  # as the cfg notes say: the blocks change the base's logits from the start
        assert not torch.allclose(logits, r18["logits"], atol=1e-6)


def test_resnet50_nonlocal_acceptance(tmp_path, caplog):
    base = timm.create_model("resnet50")
    sd = _random_base("resnet50", seed=4, model=base)
    path = str(tmp_path / "resnet50.pth")
    torch.save(sd, path)
    x = torch.randn(1, 3, 64, 64)
    expected = _logits(base, x)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = timm.create_model("resnet50_nonlocal", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert model.pretrained_cfg["tag"] == timm.models.get_pretrained_cfg("resnet50").tag
    state = model.state_dict()
    trunk, blocks = _split(model)
    assert set(trunk) == set(sd) and all(torch.equal(state[k], v) for k, v in sd.items())
    assert len(model.attention_blocks()) == 5 and len(blocks) == 5 * 13  # theta/phi/g/W conv w+b, BN w/b/mean/var/n
    assert f"resnet50_nonlocal: loaded 320 trunk tensors from {path}; 65 tensors of the nonlocal blocks keep " \
           "their init" in caplog.messages
    assert torch.equal(_logits(model, x), expected)


def test_a_tag_takes_the_base_tags_cfg(r18):
    model = timm.create_model("resnet18_nonlocal.tv_in1k", pretrained=True,
                              pretrained_cfg_overlay=dict(file=r18["safetensors"]))
    cfg, base = model.pretrained_cfg, timm.models.get_pretrained_cfg("resnet18.tv_in1k")
    assert cfg["tag"] == "tv_in1k" and cfg["url"] == base.url and cfg["license"] == base.license == "bsd-3-clause"
    assert torch.equal(_logits(model, r18["x"]), r18["logits"])


def _write(tmp_path: Path, sd: dict, name: str = "ckpt.pth") -> str:
    torch.save(sd, tmp_path / name)
    return str(tmp_path / name)


def test_a_missing_trunk_key_is_an_error_naming_it(r18, tmp_path):
    sd = dict(r18["sd"])
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(PretrainedLoadError, match=r"missing from the checkpoint: layer3\.1\.bn2\.running_var"):
        timm.create_model("resnet18_nonlocal", pretrained=True, pretrained_cfg_overlay=dict(file=_write(tmp_path, sd)))
    sd = dict(r18["sd"])
    del sd["fc.weight"]  # the classifier is loaded strictly (timm's rule) when num_classes matches
    with pytest.raises(RuntimeError, match=r"fc\.weight"):
        timm.create_model("resnet18_psa_p", pretrained=True, pretrained_cfg_overlay=dict(file=_write(tmp_path, sd)))


def test_a_misshaped_trunk_tensor_is_an_error_naming_it(r18, tmp_path):
    sd = dict(r18["sd"])
    sd["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    with pytest.raises(PretrainedLoadError, match=r"layer2\.0\.conv1\.weight \(128, 64, 1, 1\) \(model: "
                                                  r"\(128, 64, 3, 3\)\)"):
        timm.create_model("resnet18_psa_p", pretrained=True, pretrained_cfg_overlay=dict(file=_write(tmp_path, sd)))


def test_an_unexpected_key_is_an_error(r18, tmp_path):
    sd = dict(r18["sd"], **{"layer1.0.se.fc.weight": torch.zeros(4, 64, 1, 1)})  # an SE-ResNet's key
    with pytest.raises(PretrainedLoadError, match=r"the model does not have: layer1\.0\.se\.fc\.weight"):
        timm.create_model("resnet18_danet", pretrained=True, num_classes=10,  # head dropped: timm loads non-strict
                          pretrained_cfg_overlay=dict(file=_write(tmp_path, sd)))


def test_classifier_stem_and_counters_follow_timm(r18, tmp_path, caplog):
    file = dict(file=r18["pth"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        model = timm.create_model("resnet18_nonlocal", pretrained=True, num_classes=5, pretrained_cfg_overlay=file)
    assert model.fc.out_features == 5 and any("classifier re-initialised (num_classes=5" in m for m in caplog.messages)
    assert torch.equal(model.layer4[1].bn2.weight, r18["sd"]["layer4.1.bn2.weight"])
    headless = timm.create_model("resnet18_nonlocal", pretrained=True, num_classes=0, pretrained_cfg_overlay=file)
    assert isinstance(headless.fc, nn.Identity)
    gray = timm.create_model("resnet18_nonlocal", pretrained=True, in_chans=1, pretrained_cfg_overlay=file)
    assert torch.allclose(gray.conv1.weight[:, 0], r18["sd"]["conv1.weight"].sum(1))  # timm's stem adaptation
    feats = timm.create_model("resnet18_psa_p", pretrained=True, features_only=True, pretrained_cfg_overlay=file)
    assert torch.equal(feats.layer1[0].conv1.weight, r18["sd"]["layer1.0.conv1.weight"])
    # torchvision-style checkpoints have no BN counters: BatchNorm fills them, not an error
    tv = {k: v for k, v in r18["sd"].items() if not k.endswith("num_batches_tracked")}
    model = timm.create_model("resnet18_nonlocal", pretrained=True, pretrained_cfg_overlay=dict(
        file=_write(tmp_path, tv)))
    assert torch.equal(_logits(model, r18["x"]), r18["logits"])


def test_a_variant_checkpoint_loads_its_blocks_too(r18, tmp_path, caplog):
    trained = timm.create_model("resnet18_psa_p", pretrained=True, pretrained_cfg_overlay=dict(file=r18["pth"]))
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    path = _write(tmp_path, trained.state_dict())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        again = timm.create_model("resnet18_psa_p", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in again.state_dict().items())
    assert any(re.search(r"; 0 tensors of the psa_p blocks keep their init \(56 block tensors loaded", m)
               for m in caplog.messages)


# --- timm's hub route, offline --------------------------------------------------------------------------

def _hf_cache(root: Path, repo: str, sd: dict) -> None:
    """The layout huggingface_hub leaves after downloading `repo`'s model.safetensors."""
    folder = root / f"models--{repo.replace('/', '--')}"
    rev = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    (folder / "snapshots" / rev).mkdir(parents=True)
    safetensors.torch.save_file(sd, str(folder / "snapshots" / rev / "model.safetensors"))


@pytest.fixture
def hub_cache(r18, tmp_path, monkeypatch):
    """An offline Hugging Face cache with timm/resnet18.a1_in1k (r18's weights) and timm/resnet18.tv_in1k
    (other weights): what `hf download` leaves, as a user copies it to an offline machine."""
    tv = {k: v + 1 if v.is_floating_point() else v for k, v in r18["sd"].items()}
    _hf_cache(tmp_path, "timm/resnet18.a1_in1k", r18["sd"])
    _hf_cache(tmp_path, "timm/resnet18.tv_in1k", tv)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    return {"a1_in1k": r18["sd"], "tv_in1k": tv}


def test_hub_route_fetches_the_base_checkpoint(hub_cache, caplog):
    assert timm.models.get_pretrained_cfg("resnet18").tag == "a1_in1k"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        default = timm.create_model("resnet18_psa_p", pretrained=True)
        tagged = timm.create_model("resnet18_psa_p.tv_in1k", pretrained=True)
    for model, tag in ((default, "a1_in1k"), (tagged, "tv_in1k")):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in hub_cache[tag].items())
        assert any(f"from hf-hub:timm/resnet18.{tag};" in m for m in caplog.messages)


# --- smp "tu-" encoders ---------------------------------------------------------------------------------

def _encoder_trunk_loaded(model, sd) -> bool:
    state = model.encoder.model.state_dict()  # timm's features_only ResNet: the base's names, no fc
    return all(torch.equal(state[k], v) for k, v in sd.items() if not k.startswith("fc."))


def test_smp_tu_encoder_loads_the_trunk_from_a_file(r18):
    with pytest.warns(UserWarning, match="encoder_weights"):  # smp: 'tu-' encoders take True/None
        model = smp.create_model("unet", encoder_name="tu-resnet18_psa_p", encoder_weights="imagenet", classes=3,
                                 pretrained_cfg_overlay=dict(file=r18["safetensors"]))
    assert _encoder_trunk_loaded(model, r18["sd"])
    model = smp.create_model("danet", encoder_name="tu-resnet18_nonlocal", encoder_weights=True, classes=3,
                             pretrained_cfg_overlay=dict(file=r18["pth"]))
    assert _encoder_trunk_loaded(model, r18["sd"])


def test_smp_tu_encoder_through_the_hub_cache(hub_cache):
    model = smp.create_model("unet", encoder_name="tu-resnet18_psa_p.tv_in1k", encoder_weights=True, classes=3)
    assert _encoder_trunk_loaded(model, hub_cache["tv_in1k"])


def test_smp_tu_encoder_refuses_a_bad_file(r18, tmp_path):
    sd = dict(r18["sd"])
    del sd["layer2.1.conv2.weight"]
    with pytest.raises(PretrainedLoadError, match=r"layer2\.1\.conv2\.weight"):
        smp.create_model("unet", encoder_name="tu-resnet18_psa_p", encoder_weights=True, classes=3,
                         pretrained_cfg_overlay=dict(file=_write(tmp_path, sd)))


# --- models with no published weights -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resattnet56", "resattnet92", "aa_resnet50"])
def test_no_published_weights_is_a_clear_error(name):
    with pytest.raises(NoPublishedWeightsError, match=rf"{name}: no published pretrained weights exist .*Train it.*"
                                                      r"pretrained_cfg_overlay=dict\(file="):
        timm.create_model(name, pretrained=True)


def test_own_checkpoint_loads_where_none_is_published(tmp_path):
    small = dict(channels=(16, 32, 64, 128), stem_chs=16, num_classes=10)
    model = timm.create_model("resattnet56", **small)
    path = str(tmp_path / "resattnet56.safetensors")
    safetensors.torch.save_file(model.state_dict(), path)
    again = timm.create_model("resattnet56", **small, pretrained=True,  # num_classes: the checkpoint's head
                              pretrained_cfg_overlay=dict(file=path, num_classes=10))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())


def test_classification_task_starts_from_the_trunk(r18):
    """Lightning recipes: ClassificationTask(pretrained=True) takes the same route."""
    from lit_attn.tasks import ClassificationTask

    task = ClassificationTask("resnet18_nonlocal", 1000, pretrained=True,
                              model_kwargs={"pretrained_cfg_overlay": {"file": r18["safetensors"]}})
    trunk, _ = _split(task.model)
    own = task.model.state_dict()
    assert all(torch.equal(own[k], r18["sd"][k]) for k in trunk if k in r18["sd"])
    with torch.no_grad():
        assert torch.equal(task.model.eval()(r18["x"]), r18["logits"])  # nonlocal is the identity at init
