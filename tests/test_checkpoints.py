"""load_pretrained over the three local formats, and its error cases."""
import copy
import json

import pytest
import torch
from torch import nn

from drople_fast.training.pretrained import hf_to_open_clip, load_pretrained

from hf_clip import open_clip_to_hf, save_hf_clip
from drople_fast.training.tiny_clip import create_tiny_clip

# Building the test archive traces a model with torch.jit (deprecated upstream, noisy).
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]


@pytest.fixture(scope="module")
def source():
    return create_tiny_clip(seed=0).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 32, 32, generator=g)
    text = torch.randint(1, 49406, (2, 77), generator=g)
    text[:, 5] = 49407  # EOT, the argmax pooled position
    text[:, 6:] = 0
    return image, text


@pytest.fixture(scope="module")
def template():
    return create_tiny_clip(seed=1).eval()


@pytest.fixture
def target(template):
    """A fresh, differently initialised model to load into (a copy is cheaper than a new one)."""
    return copy.deepcopy(template)


def _outputs(model, inputs):
    with torch.no_grad():
        return model.encode_image(inputs[0]), model.encode_text(inputs[1]), model.logit_scale.detach().clone()


@pytest.fixture(scope="module")
def reference(source, inputs):
    """The source model's outputs, computed once."""
    return _outputs(source, inputs)


def _assert_same_outputs(model, reference, inputs):
    """Image/text features and logit scale of ``model`` equal the reference exactly."""
    for x, y in zip(_outputs(model, inputs), reference):
        assert torch.equal(x, y)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_open_clip_state_dict(tmp_path, source, inputs, target, reference):
    assert not torch.equal(target.visual.conv1.weight, source.visual.conv1.weight)
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    assert load_pretrained(target, str(path)) == "open_clip"
    _assert_same_outputs(target, reference, inputs)


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path, source, inputs, target, reference):
    path = tmp_path / "epoch_3.pt"
    sd = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}}, path)
    load_pretrained(target, str(path))
    _assert_same_outputs(target, reference, inputs)


def test_safetensors_file(tmp_path, source, inputs, target, reference):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    load_pretrained(target, str(path))
    _assert_same_outputs(target, reference, inputs)


class OpenAIStyleArchive(nn.Module):
    """Stand-in for OpenAI's released TorchScript CLIP: holds the tiny model's
    own submodules and parameters under OpenAI's names (which are open_clip's
    CLIP names), plus the ``input_resolution``/``context_length``/``vocab_size``
    buffers the real archives carry, and computes the image and text features
    with them so ``torch.jit.trace`` produces a genuine archive. The loader only
    uses ``torch.jit.load(path).state_dict()``, like open_clip's
    ``load_openai_model``."""

    def __init__(self, clip):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, p in clip.named_parameters(recurse=False):
            self.register_parameter(name, p)
        self.attn_mask = clip.attn_mask  # a plain attribute in OpenAI's model too, not a weight
        self.register_buffer("input_resolution", torch.tensor(32))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, image, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection
        return self.visual(image), x


@pytest.fixture(scope="module")
def openai_archive(tmp_path_factory, source, inputs):
    """Path of a traced OpenAI-style archive of ``source``."""
    wrapper = OpenAIStyleArchive(copy.deepcopy(source))
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, inputs, check_trace=False)
        img, txt = traced(*inputs)
    # the traced archive computes what open_clip computes
    ref = _outputs(source, inputs)
    assert torch.allclose(img, ref[0], atol=1e-6) and torch.allclose(txt, ref[1], atol=1e-6)
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    keys = set(torch.jit.load(str(path)).state_dict())
    assert {"input_resolution", "visual.proj", "transformer.resblocks.0.attn.in_proj_weight"} <= keys
    return path


def test_openai_torchscript(openai_archive, source, inputs, target, reference):
    assert load_pretrained(target, str(openai_archive)) == "openai_torchscript"
    _assert_same_outputs(target, reference, inputs)


def test_openai_torchscript_fp16_is_cast(tmp_path, openai_archive, source, target):
    path = tmp_path / "ViT-tiny-fp16.pt"
    torch.jit.save(torch.jit.load(str(openai_archive)).half(), str(path))  # OpenAI's archives hold fp16 weights
    load_pretrained(target, str(path))
    w = target.visual.conv1.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, source.visual.conv1.weight.half().float())


def test_hf_folder_round_trip(tmp_path, source, inputs, target, reference):
    folder = tmp_path / "hf"
    save_hf_clip(source, str(folder))
    config = json.loads((folder / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 12 and config["vision_config"]["patch_size"] == 8
    assert config["projection_dim"] == 32 and config["vision_config"]["hidden_act"] == "gelu"
    from safetensors.torch import load_file

    hf = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith(("visual.", "transformer.")) for k in hf)
    assert load_pretrained(target, str(folder)) == "hf"
    _assert_same_outputs(target, reference, inputs)


def test_hf_key_mapping_is_transformers_naming(source):
    sd = source.state_dict()
    hf = open_clip_to_hf(sd)
    W = sd["visual.conv1.weight"].shape[0]
    # q/k/v are the three row blocks of in_proj, in that order
    inproj = sd["visual.transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.q_proj.weight"], inproj[:W])
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.k_proj.weight"], inproj[W:2 * W])
    assert torch.equal(hf["vision_model.encoder.layers.3.self_attn.v_proj.bias"],
                      sd["visual.transformer.resblocks.3.attn.in_proj_bias"][2 * W:])
    assert torch.equal(hf["visual_projection.weight"], sd["visual.proj"].t())
    assert torch.equal(hf["text_projection.weight"], sd["text_projection"].t())
    assert torch.equal(hf["text_model.encoder.layers.11.mlp.fc2.weight"], sd["transformer.resblocks.11.mlp.c_proj.weight"])
    assert torch.equal(hf["vision_model.pre_layrnorm.weight"], sd["visual.ln_pre.weight"])
    assert torch.equal(hf["text_model.final_layer_norm.bias"], sd["ln_final.bias"])
    assert torch.equal(hf["text_model.embeddings.token_embedding.weight"], sd["token_embedding.weight"])
    assert torch.equal(hf["vision_model.embeddings.patch_embedding.weight"], sd["visual.conv1.weight"])
    # HF's position_ids buffer is ignored; the inverse is exact
    hf["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    back = hf_to_open_clip(hf)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_missing_file(tmp_path, target):
    model = target
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(model, str(tmp_path / "nope.pt"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(model, str(tmp_path / "hf"))
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(model, str(tmp_path / "hf"))


@pytest.mark.parametrize("kind", ["state_dict", "torchscript", "safetensors"])
def test_truncated_checkpoint(tmp_path, source, openai_archive, target, kind):
    if kind == "state_dict":
        path = tmp_path / "model.pt"
        torch.save(source.state_dict(), path)
    elif kind == "torchscript":
        path = tmp_path / "jit.pt"
        path.write_bytes(openai_archive.read_bytes())
    else:
        path = tmp_path / "hf"
        save_hf_clip(source, str(path))
        path = path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    snap = _snapshot(target)
    where = path.parent if kind == "safetensors" else path
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_pretrained(target, str(where))
    assert _unchanged(target, snap)


def test_garbage_and_non_state_dict(tmp_path, target):
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="garbage.bin is not a readable checkpoint"):
        load_pretrained(target, str(bad))
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(ValueError, match="not a state dict"):
        load_pretrained(target, str(lst))


def test_wrong_architecture(tmp_path, source, target):
    wide = create_tiny_clip(seed=0, vision_cfg={"width": 128})  # different vision width
    path = tmp_path / "wide.pt"
    torch.save(wide.state_dict(), path)
    snap = _snapshot(target)
    with pytest.raises(ValueError, match=r"shape mismatch .*visual.conv1.weight: checkpoint \(128, 3, 8, 8\) vs model \(64, 3, 8, 8\)"):
        load_pretrained(target, str(path))
    assert _unchanged(target, snap)

    shallow = create_tiny_clip(seed=0, text_cfg={"layers": 10})
    torch.save(shallow.state_dict(), path)
    with pytest.raises(ValueError, match=r"missing \d+: \['transformer.resblocks.10"):
        load_pretrained(target, str(path))
    assert _unchanged(target, snap)

    extra = dict(source.state_dict(), **{"prompt_learner.ctx": torch.zeros(4, 64)})
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"unexpected 1: \['prompt_learner.ctx'\]"):
        load_pretrained(target, str(path))
    assert _unchanged(target, snap)


def test_hf_folder_of_another_architecture(tmp_path, target):
    folder = tmp_path / "hf_wide"
    save_hf_clip(create_tiny_clip(seed=0, vision_cfg={"width": 128}), str(folder))
    snap = _snapshot(target)
    with pytest.raises(ValueError, match="visual.conv1.weight"):
        load_pretrained(target, str(folder))
    assert _unchanged(target, snap)


def test_hf_config_activation_and_bad_json(tmp_path, source, target):
    folder = tmp_path / "hf"
    save_hf_clip(source, str(folder))
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "quick_gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="quick_gelu but the model uses gelu"):
        load_pretrained(target, str(folder))
    (folder / "config.json").write_text("{bad")
    fresh = copy.deepcopy(source)
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(fresh, str(folder))
