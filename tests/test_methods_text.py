"""Transformer-encoder methods (hidden_mse, attention_kl, tinybert, minilm, hidden_cosine): layer maps, layer
discovery, and each loss checked against a reference computed from the Hugging Face model's own outputs
(``output_hidden_states`` / ``output_attentions``), not from kdkit's hooks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import kdkit  # noqa: E402
from kdkit import KdkitError  # noqa: E402
from kdkit.data.core import ArrayData  # noqa: E402
from kdkit.hf import HFClassifier, tiny_bert  # noqa: E402
from kdkit.losses import kd_loss  # noqa: E402
from kdkit.methods.build import build_method  # noqa: E402
from kdkit.methods.transformer_base import encoder_layout, layer_map  # noqa: E402
from kdkit.models import create_model  # noqa: E402
from kdkit.teacher import Teacher  # noqa: E402

C = 3


def models(student_heads=2, teacher_heads=2, dropout=0.0):
    torch.manual_seed(0)
    student = tiny_bert(vocab_size=40, num_labels=C, layers=2, hidden=16, heads=student_heads, dropout=dropout)
    teacher = tiny_bert(vocab_size=40, num_labels=C, layers=4, hidden=24, heads=teacher_heads, dropout=dropout)
    with torch.no_grad():  # sharper attention than a random init gives, so the KL terms are far from 0
        for model in (student, teacher):
            for block in model.hf.bert.encoder.layer:
                block.attention.self.query.weight.mul_(6.0)
                block.attention.self.value.weight.mul_(6.0)
    return student, teacher


def batch(extra_pad=0):
    x = torch.tensor([[5, 6, 7, 8, 9, 0], [11, 12, 0, 0, 0, 0], [13, 14, 15, 16, 0, 0]])
    x = torch.cat([x, torch.zeros(3, extra_pad, dtype=torch.long)], 1)
    return {"x": x, "y": torch.tensor([0, 2, 1]), "index": torch.arange(3)}


def build(name, student, teacher, **options):
    return build_method(name, student, Teacher(teacher), options, example_batch=batch(), num_samples=3,
                        num_classes=C).eval()


def hf_outputs(model, x):
    """The wrapped HF model's own hidden states and attentions on the trimmed ids, with an explicit mask."""
    x = x[:, : int((x != 0).sum(1).max())]
    with torch.no_grad():
        out = model.hf(input_ids=x, attention_mask=(x != 0).long(), output_hidden_states=True,
                       output_attentions=True)
    return out, x != 0


def ref_kl(p_t, p_s, mask):
    """KL(p_t ‖ p_s) per head and real query over real keys, averaged, by loops."""
    vals = []
    b_, h_, n_, _ = p_t.shape
    for b in range(b_):
        for h in range(h_):
            for i in range(n_):
                if mask[b, i]:
                    vals.append(sum(float(p_t[b, h, i, j]) * (math.log(float(p_t[b, h, i, j]))
                                                              - math.log(float(p_s[b, h, i, j])))
                                    for j in range(n_) if mask[b, j]))
    return sum(vals) / len(vals)


def kd_part(student, teacher, b, alpha=0.9, temperature=4.0):
    with torch.no_grad():
        s, t = student(b["x"]), teacher(b["x"])
    return alpha * kd_loss(s, t, temperature) + (1 - alpha) * F.cross_entropy(s, b["y"])


# ----------------------------------------------------------------------------- layer maps and discovery

def test_layer_maps():
    assert layer_map(3, 6, "uniform") == [(0, 1), (1, 3), (2, 5)]  # TinyBERT g(m) = 2m: teacher layers 2, 4, 6
    assert layer_map(2, 4, "uniform") == [(0, 1), (1, 3)]
    assert layer_map(4, 6, "uniform") == [(0, 0), (1, 2), (2, 3), (3, 5)]
    assert layer_map(2, 6, "last") == [(0, 4), (1, 5)]
    assert layer_map(2, 6, "final") == [(1, 5)]
    assert layer_map(3, 6, [0, -1, 5]) == [(0, 0), (2, 5)]
    assert layer_map(3, 6, [[2, 5], [0, 1]]) == [(2, 5), (0, 1)]
    assert layer_map(3, 6, "copied", source_layers=[0, 2, 4]) == [(0, 0), (1, 2), (2, 4)]
    assert layer_map(3, 6, "auto", source_layers=[0, 2, 4]) == [(0, 0), (1, 2), (2, 4)]
    assert layer_map(3, 6, "auto") == layer_map(3, 6, "uniform")  # no record of copied layers: TinyBERT's map
    with pytest.raises(ValueError, match="'copied' needs a student built from the teacher's layers"):
        layer_map(3, 6, "copied")
    for spec, msg in (("every", "must be 'auto', 'copied', 'uniform'"), ([0, 1], "the student has 3 layers"),
                      ([[0, 9]], "out of range"), ([0, 1, 6], "out of range")):
        with pytest.raises(ValueError, match=msg):
            layer_map(3, 6, spec)
    with pytest.raises(ValueError, match="no more student layers"):
        layer_map(4, 2, "last")


def test_encoder_layout_of_tiny_bert():
    student, teacher = models()
    lay = encoder_layout(teacher, "teacher")
    assert (lay.prefix, lay.num_layers, lay.width, lay.heads) == ("hf.bert.encoder.layer", 4, 24, 2)
    assert lay.pad_token_id == 0
    assert lay.projections(3) == [f"hf.bert.encoder.layer.3.attention.self.{n}" for n in ("query", "key", "value")]
    method = build("tinybert", student, teacher)
    assert method.student_layers == ["hf.bert.encoder.layer.0", "hf.bert.encoder.layer.1",
                                     *[f"hf.bert.encoder.layer.{i}.attention.self.{n}"
                                       for i in (0, 1) for n in ("query", "key", "value")]]
    assert method.teacher_layers[:2] == ["hf.bert.encoder.layer.1", "hf.bert.encoder.layer.3"]
    assert method.reads_teacher_features  # so a teacher cache for it holds these layers too


def test_shrunk_student_reads_the_layers_it_was_copied_from():
    """kdkit.hf.shrink records the kept teacher layers; the default map (auto) pairs each student layer with its
    source, a map given explicitly wins, and a student of another depth or a fresh config falls back to uniform."""
    _, teacher = models()
    student = kdkit.hf.shrink(teacher, layers=[0, 2, 3])
    assert (student.source_layers, student.source_num_layers) == ((0, 2, 3), 4)
    for name in ("hidden_mse", "tinybert"):
        assert build(name, student, teacher).hidden_pairs == [(0, 0), (1, 2), (2, 3)]
    assert build("attention_kl", student, teacher).attention_pairs == [(0, 0), (1, 2), (2, 3)]
    assert build("tinybert", student, teacher, layer_map="uniform").hidden_pairs == [(0, 0), (1, 1), (2, 3)]
    fresh = kdkit.hf.shrink(teacher, layers=[0, 2], hidden=16)  # random init: nothing was copied
    assert getattr(fresh, "source_layers", None) is None
    assert build("tinybert", fresh, teacher).hidden_pairs == [(0, 1), (1, 3)]
    deeper = tiny_bert(vocab_size=40, num_labels=C, layers=6, hidden=24, heads=2)  # not the shrunk model's teacher
    assert build("hidden_mse", student, deeper).hidden_pairs == [(0, 1), (1, 3), (2, 5)]
    with pytest.raises(KdkitError, match="'copied' needs a student built from the teacher's layers"):
        build("hidden_mse", fresh, teacher, layer_map="copied")


def test_tinybert_default_weights():
    """loss = 0.9 KD + 0.1 CE + 0.1 (hidden + attention): beta 0.1 by default, each inner weight 1."""
    student, teacher = models()
    method = build("tinybert", student, teacher)
    assert method.beta == 0.1
    b = batch()
    out = method(b)
    expected = kd_part(student, teacher, b).item() + 0.1 * (out["hidden"].item() + out["attn_kl"].item())
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    assert out["hidden"].item() > 0.1 and out["attn_kl"].item() > 1e-3  # the feature terms are not vacuous here


# ----------------------------------------------------------------------------- losses against HF's own outputs

def test_hidden_mse_equals_reference_from_hf_hidden_states():
    student, teacher = models()
    method = build("hidden_mse", student, teacher, beta=2.0)
    b = batch()
    out = method(b)
    s_out, mask = hf_outputs(student, b["x"])
    t_out, _ = hf_outputs(teacher, b["x"])
    ref = 0.0
    with torch.no_grad():
        for s, t in ((0, 1), (1, 3)):  # uniform map of 2 onto 4 layers; hidden_states[k + 1] = block k's output
            hs, ht = method.projection(s_out.hidden_states[s + 1]), t_out.hidden_states[t + 1]
            keep = mask.unsqueeze(-1).expand_as(ht)
            ref += ((hs - ht)[keep] ** 2).mean().item()
    assert out["hidden"].item() == pytest.approx(ref, rel=1e-5)
    assert isinstance(method.projection, torch.nn.Linear)  # widths 16 -> 24: a learned map, trained
    assert {id(p) for p in method.projection.parameters()} <= {id(p) for p in method.parameters()}
    assert out["loss"].item() == pytest.approx(kd_part(student, teacher, b).item() + 2.0 * ref, rel=1e-5)


def test_attention_kl_equals_reference_from_hf_attentions():
    student, teacher = models()
    method = build("attention_kl", student, teacher, layer_map="last", alpha=0.5, temperature=2.0)
    b = batch()
    out = method(b)
    s_out, mask = hf_outputs(student, b["x"])
    t_out, _ = hf_outputs(teacher, b["x"])
    # eager attention returns the probabilities it used: the method's recomputation from q/k must agree
    ref = sum(ref_kl(t_out.attentions[t], s_out.attentions[s], mask) for s, t in ((0, 2), (1, 3)))
    assert out["attn_kl"].item() == pytest.approx(ref, rel=1e-4)
    # default beta 0.1 (measured in benchmarks/tinybert_scale.py: beta 1 let the KL swamp the cross-entropy)
    assert out["loss"].item() == pytest.approx(kd_part(student, teacher, b, 0.5, 2.0).item() + 0.1 * ref, rel=1e-4)


def test_minilm_equals_reference_on_last_layer():
    student, teacher = models()
    method = build("minilm", student, teacher, alpha=0.0)
    b = batch()
    out = method(b)
    s_out, mask = hf_outputs(student, b["x"])
    t_out, _ = hf_outputs(teacher, b["x"])
    at = ref_kl(t_out.attentions[3], s_out.attentions[1], mask)
    assert out["minilm_at"].item() == pytest.approx(at, rel=1e-4)
    # value relation: softmax(V V^T / sqrt(d)) from the last blocks' value projections, by hand
    vals = {}
    hooks = [m.hf.bert.encoder.layer[k].attention.self.value.register_forward_hook(
        lambda mod, i, o, who=who: vals.__setitem__(who, o)) for m, k, who in ((student, 1, "s"), (teacher, 3, "t"))]
    hf_outputs(student, b["x"]), hf_outputs(teacher, b["x"])
    for h in hooks:
        h.remove()

    def rel(v, heads):
        bsz, n, w = v.shape
        v = v.view(bsz, n, heads, w // heads).transpose(1, 2)
        scores = v @ v.transpose(-1, -2) / math.sqrt(w // heads)
        return scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1)

    vr = ref_kl(rel(vals["t"], 2), rel(vals["s"], 2), mask)
    assert out["minilm_vr"].item() == pytest.approx(vr, rel=1e-4)
    with torch.no_grad():
        ce = F.cross_entropy(student(b["x"]), b["y"]).item()
    assert out["loss"].item() == pytest.approx(ce + at + vr, rel=1e-4)  # alpha 0: labels plus the feature term


def test_hidden_cosine_equals_reference_on_final_states():
    student, teacher = models()
    method = build("hidden_cosine", student, teacher, beta=3.0)
    b = batch()
    out = method(b)
    s_out, mask = hf_outputs(student, b["x"])
    t_out, _ = hf_outputs(teacher, b["x"])
    with torch.no_grad():
        hs, ht = method.projection(s_out.hidden_states[-1]), t_out.hidden_states[-1]
    cos = [F.cosine_similarity(hs[i, j], ht[i, j], dim=0).item() for i in range(3) for j in range(hs.shape[1])
           if mask[i, j]]
    assert out["cos"].item() == pytest.approx(sum(1 - c for c in cos) / len(cos), rel=1e-5)


@pytest.mark.parametrize("name", ["hidden_mse", "attention_kl", "tinybert", "minilm", "hidden_cosine"])
def test_padding_never_contributes(name):
    """Models that run every column (no trimming): extra pad columns must leave every part unchanged."""
    student, teacher = models()
    s_full, t_full = HFClassifier(student.hf, 0, trim=False), HFClassifier(teacher.hf, 0, trim=False)
    method = build(name, s_full, t_full)
    with torch.no_grad():
        short, wide = method(batch()), method(batch(extra_pad=5))
    for key, value in short.items():
        if key != "logits":
            assert wide[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key


# ----------------------------------------------------------------------------- options and errors

def test_heads_must_match_unless_relation_heads():
    student, teacher = models(student_heads=4, teacher_heads=2)
    with pytest.raises(KdkitError, match="4 attention heads and the teacher 2.*relation_heads"):
        build("minilm", student, teacher)
    method = build("minilm", student, teacher, relation_heads=4)  # 16 and 24 both split into 4
    assert math.isfinite(method(batch())["loss"].item())
    with pytest.raises(KdkitError, match="relation_heads 5 does not divide"):
        build("attention_kl", student, teacher, relation_heads=5)


def test_bad_students_and_options_are_one_line_errors():
    student, teacher = models()
    bag = create_model("mlp", num_classes=C, input_shape=(6,), hidden=(8,))
    with pytest.raises(KdkitError, match="pad_token_id"):
        build("hidden_mse", bag, teacher)
    bag.pad_token_id = 0
    with pytest.raises(KdkitError, match="no encoder layers.*use kd"):
        build("tinybert", bag, teacher)
    with pytest.raises(KdkitError, match="pad ids differ"):
        build("hidden_mse", HFClassifier(student.hf, 1), teacher)
    with pytest.raises(KdkitError, match="widths.*|hidden width 16 differs"):
        build("hidden_cosine", student, teacher, projection="none")
    with pytest.raises(KdkitError, match="layer_map must be"):
        build("hidden_mse", student, teacher, layer_map="every")
    with pytest.raises(KdkitError, match="unknown option 'betta'"):
        build("minilm", student, teacher, betta=1.0)
    with pytest.raises(KdkitError, match="alpha must be in"):
        build("attention_kl", student, teacher, alpha=1.5)


def test_combo_shares_one_forward_and_adds_terms():
    student, teacher = models()
    b = batch()
    combo = build("combo", student, teacher, parts={"kd": {"weight": 1.0}, "hidden_mse": {"weight": 1.0, "alpha": 0.0,
                                                                                           "layer_map": "final"}})
    single = build("hidden_mse", student, teacher, layer_map="final")
    single.projection.load_state_dict(combo.parts["hidden_mse"].projection.state_dict())  # same W_h
    assert combo.shared == ["kd", "hidden_mse"]
    with torch.no_grad():
        out, ref = combo(b), single(b)
        ce = F.cross_entropy(student(b["x"]), b["y"])
    # combo = kd (0.9 KD + 0.1 CE) + (CE + hidden); the single method = 0.9 KD + 0.1 CE + hidden
    assert out["loss"].item() == pytest.approx(ref["loss"].item() + ce.item(), rel=1e-5)


def test_distill_end_to_end_on_token_ids(tmp_path):
    """The loop, the cache plan (a feature cache of the teacher layers) and the report take text models unchanged."""
    student, teacher = models(dropout=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 40, (24, 6), generator=g)
    x[::3, 4:] = 0
    data = ArrayData(x, torch.randint(0, C, (24,), generator=g))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run = kdkit.distill(teacher, student, data, method="tinybert", epochs=1, batch_size=8, lr=1e-3,
                        out_dir=tmp_path / "run", progress=False)
    logged = run.history[0]
    parts = [f"train_{k}" for k in ("hidden", "attn_kl", "kd", "ce")]
    assert all(math.isfinite(logged[k]) for k in parts)
    assert any(not torch.equal(v, run.student.state_dict()[k]) for k, v in before.items())
    assert (tmp_path / "run" / "checkpoints" / "best.safetensors").exists()


def test_distilbert_teacher_layout_and_step():
    """DistilBERT names its blocks and projections differently (transformer.layer.i.attention.q_lin): found."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(vocab_size=40, dim=24, n_layers=3, n_heads=2, hidden_dim=48, pad_token_id=0,
                                           num_labels=C)
    teacher = HFClassifier(transformers.DistilBertForSequenceClassification(config), 0)
    lay = encoder_layout(teacher, "teacher")
    assert (lay.prefix, lay.num_layers, lay.width, lay.heads) == ("hf.distilbert.transformer.layer", 3, 24, 2)
    assert lay.qkv == ("attention.q_lin", "attention.k_lin", "attention.v_lin")
    student, _ = models()
    method = build("tinybert", student, teacher)
    assert method.hidden_pairs == [(0, 0), (1, 2)]  # uniform: floor(m * 3 / 2) - 1 for m = 1, 2
    out = method(batch())
    assert all(math.isfinite(out[k].item()) for k in ("loss", "hidden", "attn_kl"))
