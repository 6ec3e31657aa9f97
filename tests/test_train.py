"""llmodel training: labels, packing through the varlen ops, freeze policies, resume, FSDP2, learning."""
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llmodel import data as data_mod, formats, synthetic
from llmodel.config import LMConfig, MambaConfig, MoEConfig
from llmodel.lm import Packing
from llmodel.multimodal import LongLLaVA, MultimodalConfig
from llmodel.train import STAGES, Trainee, TrainConfig, apply_freeze_policy, latest_checkpoint, param_groups, train
from llmodel.vision import VisionConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = {stage: synthetic.make_split(root / stage, stage, n, seed=1, max_images=4)
             for stage, n in (("align", 24), ("single", 24), ("multi", 24), ("text", 12))}
    tokenizer_path = root / "tokenizer.json"
    return paths, synthetic.build_tokenizer(str(tokenizer_path)), str(tokenizer_path)


def tiny_config(tokenizer) -> MultimodalConfig:
    vision = VisionConfig.from_hf({"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32,
                                   "patch_size": 8})  # 4x4 patches -> 4 tokens per image
    lm = LMConfig(model_type="jamba", vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                  num_layers=4, num_heads=4, num_kv_heads=2, attn_layer_period=4, attn_layer_offset=2,
                  expert_layer_period=2, expert_layer_offset=1, max_position_embeddings=4096, bos_token_id=None,
                  eos_token_id=tokenizer.token_to_id("<|endoftext|>"),
                  mamba=MambaConfig(d_state=4, d_conv=4, expand=2, dt_rank=4), moe=MoEConfig(num_experts=2, top_k=1))
    return MultimodalConfig(vision=vision, lm=lm, vision_feature_layer=-1)


def tiny_model(tokenizer, seed=0) -> LongLLaVA:
    torch.manual_seed(seed)
    return LongLLaVA(tiny_config(tokenizer))


def conversations(corpus, stage, pack_len=None, replay=()):
    paths, tokenizer, _ = corpus
    sources = [data_mod.Source(str(paths[stage]))] + [data_mod.Source(str(paths[s]), share) for s, share in replay]
    return data_mod.Conversations(sources, tokenizer, tiny_config(tokenizer), max_len=pack_len)


# ---------------------------------------------------------------- data

def test_targets_are_exactly_the_assistant_answers(corpus):
    """Every trained target is an answer token or the end-of-answer token, in order, and nothing else."""
    _, tokenizer, _ = corpus
    convs = conversations(corpus, "single")
    eos = tokenizer.token_to_id("<|endoftext|>")
    for i in range(5):
        example = convs.example(i)
        record = convs.records[i][1]
        expected = []
        for turn in record["conversations"][1::2]:
            expected += tokenizer.encode(turn["value"], add_special_tokens=False).ids + [eos]
        trained = example.targets != formats.IGNORE_INDEX
        assert example.targets[trained].tolist() == expected
        # target t is token t + 1, and the last position predicts nothing
        positions = trained.nonzero()[:, 0]
        assert torch.equal(example.input_ids[positions + 1], example.targets[positions])
        assert example.targets[-1] == formats.IGNORE_INDEX
        # no image row and no user text is trained
        for start, n in example.image_spans:
            assert not trained[max(start - 1, 0):start + n - 1].any()
        assert convs.num_targets[i] == len(expected)


def test_pack_targets_never_cross_a_boundary(corpus):
    convs = conversations(corpus, "multi")
    pack = data_mod.build_pack([convs.example(i) for i in range(3)], step_targets=0)
    ends = torch.tensor(pack.lengths).cumsum(0) - 1
    assert (pack.targets[0, ends] == formats.IGNORE_INDEX).all()
    assert pack.num_targets == sum(convs.num_targets[:3])
    assert pack.pixel_values.shape[0] == len(pack.image_spans)
    for start, n in pack.image_spans:  # spans point at image placeholder rows
        assert (pack.input_ids[0, start:start + n] == 0).all()


def test_long_sample_is_truncated_with_a_warning_not_dropped(corpus):
    paths, tokenizer, _ = corpus
    full = conversations(corpus, "multi")
    longest = max(range(len(full)), key=lambda i: full.lengths[i])
    limit = full.lengths[longest] - 3
    with pytest.warns(UserWarning, match="truncated to"):
        cut = conversations(corpus, "multi", pack_len=limit)
    assert len(cut) == len(full)
    example = cut.example(longest)
    assert len(example.input_ids) <= limit
    for start, n in example.image_spans:  # never cut inside an image
        assert start + n <= len(example.input_ids)
    assert example.pixel_values is None or example.pixel_values.shape[0] == len(example.image_spans)


def test_replay_share_is_spread_through_the_epoch(corpus):
    convs = conversations(corpus, "multi", replay=(("single", 0.2), ("text", 0.1)))
    order = data_mod.epoch_order(convs, seed=3, epoch=0)
    source = [convs.records[i][0] for i in order]
    main = len(convs.indices_of(0))
    assert source.count(0) == main
    assert source.count(1) == round(0.2 / 0.7 * main) and source.count(2) == round(0.1 / 0.7 * main)
    half = len(source) // 2  # stratified: each half carries about half of each source
    for s in (1, 2):
        assert abs(source[:half].count(s) - source[half:].count(s)) <= 2
    assert order == data_mod.epoch_order(convs, seed=3, epoch=0)
    assert order != data_mod.epoch_order(convs, seed=3, epoch=1)
    with pytest.raises(ValueError, match="replay shares"):
        data_mod.epoch_order(conversations(corpus, "multi", replay=(("single", 1.2),)), 0, 0)


def test_loader_order_is_the_same_with_worker_processes(corpus):
    stream = data_mod.PackStream(conversations(corpus, "single"), pack_len=256, packs_per_step=2, seed=0)
    inline = [p.input_ids for p in data_mod.loader(stream, 1, 4, accumulation=2, workers=0)]
    workers = [p.input_ids for p in data_mod.loader(stream, 1, 4, accumulation=2, workers=2)]
    assert len(inline) == 6 and all(torch.equal(a, b) for a, b in zip(inline, workers))


# ---------------------------------------------------------------- model + loss

def test_packed_loss_equals_each_conversation_alone(corpus):
    """One packed row through the varlen ops == every conversation run on its own (loss and gradients)."""
    _, tokenizer, _ = corpus
    convs = conversations(corpus, "multi")
    examples = [convs.example(i) for i in range(4)]
    model = tiny_model(tokenizer)
    trainee = Trainee(model, loss_chunk=7)
    pack = data_mod.build_pack(examples, step_targets=0)
    packed = trainee(pack.input_ids, pack.targets, Packing.from_lengths(pack.lengths), pack.pixel_values,
                     pack.image_spans)
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = 0
    for e in examples:
        one = data_mod.build_pack([e], step_targets=0)
        loss = trainee(one.input_ids, one.targets, Packing.from_lengths(one.lengths), one.pixel_values,
                       one.image_spans)
        loss.backward()
        alone = alone + loss.detach()
    assert abs(packed.item() - alone.item()) <= 1e-5 * abs(alone.item())
    for n, p in model.named_parameters():
        if p.grad is not None:  # (attention's k bias has a zero gradient: compare with an absolute floor)
            diff = (packed_grads[n] - p.grad).norm()
            assert diff <= 1e-4 * p.grad.norm() + 1e-6, f"{n}: packed gradient differs by {diff:.2e}"
    # and unpacked (no Packing at all) gives the same loss for a single conversation
    one = data_mod.build_pack([examples[0]], 0)
    hidden = model(one.input_ids, one.pixel_values, one.image_spans, return_hidden=True)[0]
    rows = (one.targets[0] != formats.IGNORE_INDEX).nonzero()[:, 0]
    plain = torch.nn.functional.cross_entropy(model.lm.lm_head(hidden[rows]), one.targets[0, rows], reduction="sum")
    with torch.no_grad():
        via_pack = trainee(one.input_ids, one.targets, Packing.from_lengths(one.lengths), one.pixel_values,
                           one.image_spans)
    assert abs(plain.item() - via_pack.item()) <= 1e-5 * plain.item()


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_freeze_policy_trains_exactly_its_parts(corpus, stage):
    _, tokenizer, _ = corpus
    model = tiny_model(tokenizer)
    config = TrainConfig(stage=stage)
    trained = apply_freeze_policy(model, config.parts())
    optimizer = torch.optim.AdamW(param_groups(trained, config))
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    prefixes = {"vision": "vision_tower", "projector": "mm_projector", "lm": "lm."}
    convs = conversations(corpus, "single")
    pack = data_mod.build_pack([convs.example(0)], 0)
    Trainee(model, 64)(pack.input_ids, pack.targets, Packing.from_lengths(pack.lengths), pack.pixel_values,
                       pack.image_spans).backward()
    for name, p in model.named_parameters():
        should = any(name.startswith(prefixes[part]) for part in STAGES[stage])
        assert p.requires_grad == should and (id(p) in in_optimizer) == should, name
        assert (p.grad is not None) == should, name
    lrs = {g["name"].split("/")[0]: g["lr"] for g in optimizer.param_groups}
    assert set(lrs) == set(STAGES[stage])


def test_a_policy_that_trains_nothing_is_an_error(corpus):
    _, tokenizer, _ = corpus
    with pytest.raises(ValueError, match="trains no parameter"):
        apply_freeze_policy(tiny_model(tokenizer), ())
    with pytest.raises(ValueError, match="trainable: unknown parts"):
        TrainConfig(stage="align", trainable=["decoder"])


# ---------------------------------------------------------------- runs

def run_stage(corpus, out, steps, resume=False, **overrides):
    paths, tokenizer, tokenizer_path = corpus
    config = TrainConfig(**{**dict(stage="single", steps=steps, pack_len=256, workers=0, warmup_ratio=0.2,
                                   lr=3e-3, projector_lr=3e-3, seed=5), **overrides})
    return train(config, [str(paths["single"])], str(out), tokenizer_path=tokenizer_path,
                 model=tiny_model(tokenizer, seed=5), progress=False, resume=resume)


def test_resume_continues_the_same_loss_curve_bit_identically(corpus, tmp_path):
    straight = run_stage(corpus, tmp_path / "straight", 6, save_every=3, keep_last=3)
    # an interrupted run: only the step-3 checkpoint made it to disk
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-0000003", resumed_dir / "step-0000003")
    resumed = run_stage(corpus, tmp_path / "resumed", 6, save_every=3, resume=True)
    assert resumed["losses"] == straight["losses"][3:]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["tokens_per_s"] > 0 for r in rows)


def test_interrupted_save_leaves_the_latest_checkpoint_intact(corpus, tmp_path, monkeypatch):
    from llmodel import train as train_mod

    run_stage(corpus, tmp_path, 2, save_every=1, keep_last=2)
    before = latest_checkpoint(tmp_path)
    assert before.name == "step-0000002"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut while writing")
    monkeypatch.setattr(train_mod, "save_longllava", crash)
    with pytest.raises(KeyboardInterrupt):
        run_stage(corpus, tmp_path, 3, save_every=1, resume=True)
    assert latest_checkpoint(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]


def test_resume_refuses_a_checkpoint_without_its_optimizer_states(corpus, tmp_path):
    run_stage(corpus, tmp_path, 2, save_every=1)
    shutil.rmtree(latest_checkpoint(tmp_path) / "optimizer")
    with pytest.raises(FileNotFoundError, match="no optimizer/"):
        run_stage(corpus, tmp_path, 3, resume=True)


def test_fifty_steps_lower_the_loss(corpus, tmp_path):
    result = run_stage(corpus, tmp_path, 50, warmup_ratio=0.1)
    first, last = sum(result["losses"][:5]) / 5, sum(result["losses"][-5:]) / 5
    assert last < 0.5 * first, f"loss {first:.3f} -> {last:.3f}"


FSDP_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_train import tiny_model
from llmodel import synthetic
from llmodel.train import TrainConfig, train
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokenizer!r})
accumulation = int(sys.argv[1])
config = TrainConfig(stage="single", steps=4, pack_len=256, workers=0, accumulation=accumulation, seed=5,
                     lr=3e-3, projector_lr=3e-3, warmup_ratio=0.2, save_every=2)
mode = sys.argv[3] if len(sys.argv) > 3 else ""  # "resume", or "init:DIR" (weights from a saved model)
init = mode[len("init:"):] if mode.startswith("init:") else None
result = train(config, [{data!r}], sys.argv[2], tokenizer_path={tokenizer!r}, init=init,
               model=None if init else tiny_model(tok, seed=5), progress=False, resume=mode == "resume")
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    json.dump(result["losses"], open(sys.argv[2] + "/losses.json", "w"))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def test_fsdp_two_processes_match_one_process_and_resume(corpus, tmp_path):
    """FSDP2 (fully_shard) over 2 gloo processes, 1 pack each per step == 1 process accumulating 2 packs;
    the sharded run resumed from its step-2 checkpoint continues the same loss curve bit-identically."""
    paths, _, tokenizer_path = corpus
    script = tmp_path / "run.py"
    script.write_text(FSDP_SCRIPT.format(tests=str(REPO / "tests"), tokenizer=tokenizer_path,
                                         data=str(paths["single"])))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), "2", str(tmp_path / "one")], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), "1", str(tmp_path / "two")], check=True, env=env, timeout=600)
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    two = json.loads((tmp_path / "two" / "losses.json").read_text())
    first = one[0]
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)
    # the sharded run's checkpoint is a complete, loadable model
    from llmodel.multimodal import load_longllava
    assert load_longllava(tmp_path / "two" / "final") is not None
    # ... its optimizer written by both ranks, each its own shards; resuming from it gives the same curve
    step2 = tmp_path / "two" / "checkpoints" / "step-0000002"
    assert len(list((step2 / "optimizer").glob("*.distcp"))) == 2
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), "1", str(tmp_path / "resumed"), "resume"], check=True, env=env, timeout=600)
    assert json.loads((tmp_path / "resumed" / "losses.json").read_text()) == two[2:]
    # a next stage from that model (--init): rank 0 alone reads it, rank 1 builds on meta and gets its shards
    init = f"init:{tmp_path / 'two' / 'final'}"
    subprocess.run([sys.executable, str(script), "2", str(tmp_path / "one-next"), init], check=True, env=env,
                   timeout=600)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), "1", str(tmp_path / "two-next"), init], check=True, env=env, timeout=600)
    one = json.loads((tmp_path / "one-next" / "losses.json").read_text())
    two = json.loads((tmp_path / "two-next" / "losses.json").read_text())
    assert len(one) == len(two) == 4 and one[0] < first  # the same first packs: the trained weights score better
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), (one, two)


def test_plot_command_draws_the_loss_curve(corpus, tmp_path):
    pytest.importorskip("matplotlib")
    run_stage(corpus, tmp_path, 2)
    from llmodel.__main__ import main
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_eval_commands_on_a_trained_run(corpus, tmp_path):
    """`eval tasks` and `eval vniah` run end to end on a (barely) trained run and write the heatmap."""
    pytest.importorskip("matplotlib")
    paths, _, _ = corpus
    run_stage(corpus, tmp_path, 2)
    from llmodel.__main__ import main
    assert main(["eval", "tasks", "--model", str(tmp_path), "--data", str(paths["single"]), "--limit", "3"]) == 0
    assert main(["eval", "vniah", "--model", str(tmp_path), "--images", "2", "3", "--depths", "0", "1",
                 "--samples", "1", "--chunk-size", "16", "--out", str(tmp_path / "vniah")]) == 0
    result = json.loads((tmp_path / "vniah" / "vniah.json").read_text())
    assert result["sizes"] == [2, 3] and len(result["accuracy"]) == 2 and len(result["accuracy"][0]) == 2
    assert all(0 <= a <= 1 for row in result["accuracy"] for a in row)
    assert (tmp_path / "vniah" / "vniah.png").stat().st_size > 1000


def test_train_command_line_runs_a_stage_and_chains_the_next(corpus, tmp_path):
    """`python -m llmodel train`: a first stage from a JSON config, the next from its final/ (as the demo)."""
    from dataclasses import asdict

    from llmodel.__main__ import main
    paths, tokenizer, tokenizer_path = corpus
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(asdict(tiny_config(tokenizer))))
    common = ["--steps", "2", "--pack-len", "256", "--workers", "0", "--no-progress"]
    assert main(["train", "--stage", "align", "--config", str(config_file), "--tokenizer", tokenizer_path,
                 "--data", str(paths["align"]), "--out", str(tmp_path / "s1"), *common]) == 0
    assert main(["train", "--stage", "multi", "--init", str(tmp_path / "s1" / "final"), "--data", str(paths["multi"]),
                 "--replay", f"{paths['single']}:0.2", "--replay", f"{paths['text']}:0.1",
                 "--out", str(tmp_path / "s3"), *common]) == 0
    record = json.loads((tmp_path / "s3" / "train_config.json").read_text())
    assert set(record["trainable"]) == {"projector", "lm"} and record["total_steps"] == 2
    assert main(["train", "--stage", "align", "--train", "", "--init", str(tmp_path / "s1" / "final"),
                 "--data", str(paths["align"]), "--out", str(tmp_path / "bad"), *common]) == 2


def test_demo_pipeline_end_to_end(tmp_path):
    """`python -m llmodel demo --quick`: the same pipeline as the full demo (data, three chained stages with
    replay, evaluation per task, which-among-8, V-NIAH, plots), seconds long. Accuracy is not asserted (3
    steps per stage); what is: every task is scored against its chance, and every promised file exists."""
    from llmodel.demo import QUICK, run_demo

    report = run_demo(str(tmp_path / "demo"), plan=QUICK, progress=False)
    accuracy = report["accuracy"]
    assert set(accuracy) == {"colour", "shape", "position", *synthetic.MULTI_TASKS, "which@8"}
    assert accuracy["which@8"]["total"] >= QUICK.which8
    assert accuracy["which@8"]["chance"] == pytest.approx(1 / 8)
    for task, result in accuracy.items():
        assert result["total"] > 0 and 0 <= result["correct"] <= result["total"], task
    assert len(report["vniah"]["accuracy"]) == len(QUICK.vniah_sizes)
    for name in ("report.json", "loss.png", "vniah.png", "stage3-multi/final/model.safetensors",
                 "stage1-align/metrics.jsonl", "stage2-single/metrics.jsonl", "stage3-multi/metrics.jsonl"):
        assert (tmp_path / "demo" / name).is_file(), name
    stage3 = json.loads((tmp_path / "demo" / "stage3-multi" / "train_config.json").read_text())
    assert stage3["config"]["steps"] == QUICK.steps[2] and stage3["config"]["stage"] == "multi"
    # stage III freezes the tower again (LongLLaVA's policy): its weights leave stage III as stage II left them
    from safetensors.torch import load_file
    before = load_file(str(tmp_path / "demo" / "stage2-single" / "final" / "model.safetensors"))
    after = load_file(str(tmp_path / "demo" / "stage3-multi" / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    tower = [k for k in before if k.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert not torch.equal(before["model.mm_projector.0.weight"], after["model.mm_projector.0.weight"])


# ---------------------------------------------------------------- AnyRes (LLaVA-NeXT / OneVision) training

ANYRES_PINPOINTS = [(32, 64), (64, 32), (64, 64)]  # tile 32: 1x2, 2x1, 2x2 grids
ANYRES_SIZES = [(50, 35), (32, 64), (40, 40), (70, 30)]


@pytest.fixture(scope="module")
def anyres_corpus(corpus, tmp_path_factory):
    """The multi-image and single-image splits with each image resized to one of ANYRES_SIZES (cycling),
    so records hold images of different shapes, hence different tile grids and token counts."""
    from PIL import Image

    paths, tokenizer, tokenizer_path = corpus
    root = tmp_path_factory.mktemp("anyres")
    out = {}
    for split in ("single", "multi"):
        source = Path(paths[split]).parent
        records = data_mod.read_jsonl(paths[split])
        k = 0
        for record in records:
            for name in record.get("image") or []:
                (root / split / name).parent.mkdir(parents=True, exist_ok=True)
                Image.open(source / name).resize(ANYRES_SIZES[k % len(ANYRES_SIZES)]).save(root / split / name)
                k += 1
        out[split] = root / split / "data.jsonl"
        out[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return out, tokenizer, tokenizer_path


def image_size_of(path) -> tuple:
    from PIL import Image
    with Image.open(path) as image:
        return image.size


def anyres_config(tokenizer) -> MultimodalConfig:
    from dataclasses import replace
    return replace(tiny_config(tokenizer), image_aspect_ratio="anyres", image_grid_pinpoints=ANYRES_PINPOINTS)


def test_anyres_examples_fill_each_image_by_its_size_as_inference_does(anyres_corpus):
    """Each image fills tokens_for_anyres(its size) rows; its pixels are its base image and tiles; and the
    groups the trainer hands the model are the ones chat.build_inputs makes for the same image."""
    from llmodel.chat import build_inputs

    paths, tokenizer, _ = anyres_corpus
    config = anyres_config(tokenizer)
    convs = data_mod.Conversations([data_mod.Source(str(paths["multi"]))], tokenizer, config)
    model = LongLLaVA(config)
    seen = set()
    for i in range(len(convs)):
        example, record = convs.example(i), convs.records[i][1]
        names = record.get("image") or []
        if not names:
            assert example.pixel_values is None and example.image_sizes is None
            continue
        files = [Path(paths["multi"]).parent / n for n in names]
        sizes = [image_size_of(f) for f in files]
        assert example.image_sizes == sizes
        assert [n for _, n in example.image_spans] == [config.tokens_for_anyres(s) for s in sizes]
        groups, group_sizes = data_mod.pixel_groups(config, example.pixel_values, example.image_sizes)
        assert group_sizes == sizes
        for group, size, file in zip(groups, sizes, files):
            rows, cols = config.anyres_layout(size)
            assert group.shape == (1 + rows * cols, 3, 32, 32)
            seen.add((rows, cols))
            reference = build_inputs(model, "1", images=[file])  # token-id prompt: no tokenizer needed
            assert reference.image_sizes == [size] and torch.equal(reference.images[0], group)
    assert seen == {(1, 2), (2, 1), (2, 2)}  # every grid shape occurs
    with pytest.raises(ValueError, match="pixel rows"):
        data_mod.pixel_groups(config, example.pixel_values[1:], example.image_sizes)


def test_anyres_packed_loss_equals_each_conversation_alone(anyres_corpus):
    paths, tokenizer, _ = anyres_corpus
    convs = data_mod.Conversations([data_mod.Source(str(paths["multi"]))], tokenizer, anyres_config(tokenizer))
    examples = [convs.example(i) for i in range(4)]
    assert sum(len(e.image_spans) for e in examples) >= 4
    torch.manual_seed(0)
    model = LongLLaVA(anyres_config(tokenizer))
    trainee = Trainee(model, loss_chunk=7)
    pack = data_mod.build_pack(examples, step_targets=0)
    assert len(pack.image_sizes) == len(pack.image_spans)
    packed = trainee(pack.input_ids, pack.targets, Packing.from_lengths(pack.lengths), pack.pixel_values,
                     pack.image_spans, pack.image_sizes)
    packed.backward()
    newline_grad = model.image_newline.grad.clone()
    assert newline_grad.abs().sum() > 0  # the row separator is trained
    model.zero_grad()
    alone = 0
    for e in examples:
        one = data_mod.build_pack([e], step_targets=0)
        loss = trainee(one.input_ids, one.targets, Packing.from_lengths(one.lengths), one.pixel_values,
                       one.image_spans, one.image_sizes)
        loss.backward()
        alone = alone + loss.detach()
    assert abs(packed.item() - alone.item()) <= 1e-5 * abs(alone.item())
    assert (newline_grad - model.image_newline.grad).norm() <= 1e-4 * newline_grad.norm()


def test_anyres_model_trains_saves_and_answers(anyres_corpus, tmp_path):
    """A few steps of stage II on an AnyRes model: the run writes a checkpoint that loads as AnyRes, and the
    evaluator tiles images for it (the same rows as training)."""
    from llmodel.evaluate import evaluate_tasks, load_for_eval

    paths, tokenizer, tokenizer_path = anyres_corpus
    torch.manual_seed(0)
    config = TrainConfig(stage="single", steps=3, pack_len=256, workers=0, lr=3e-3, projector_lr=3e-3, seed=5)
    result = train(config, [str(paths["single"])], str(tmp_path), tokenizer_path=tokenizer_path,
                   model=LongLLaVA(anyres_config(tokenizer)), progress=False)
    assert len(result["losses"]) == 3 and all(loss > 0 for loss in result["losses"])
    model, tok = load_for_eval(result["final"])
    assert model.config.image_aspect_ratio == "anyres" and model.image_newline is not None
    calls, generate = [], model.generate
    model.generate = lambda *a, **k: calls.append(k["image_sizes"]) or generate(*a, **k)
    scores = evaluate_tasks(model, tok, str(paths["single"]), limit=3)
    assert sum(r["total"] for r in scores.values()) == 3
    records = data_mod.read_jsonl(paths["single"])[:3]
    assert calls == [[image_size_of(Path(paths["single"]).parent / r["image"][0])] for r in records]


def test_models_whose_checkpoints_cannot_be_written_are_refused_before_training(corpus, tmp_path):
    from llmodel.multimodal import named_multimodal_config

    paths, tokenizer, tokenizer_path = corpus
    with pytest.raises(NotImplementedError, match="LongLLaVA's layout.*dinov2 \\+ siglip_vision_model"):
        train(TrainConfig(stage="single", steps=1, workers=0), [str(paths["single"])], str(tmp_path),
              tokenizer_path=tokenizer_path, model=LongLLaVA(named_multimodal_config("tiny-cobra")), progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()
