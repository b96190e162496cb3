"""SmolLM2-135M-Instruct (tests/real_model.py: the Q4_1 GGUF from PyPI, dequantised) through
our model: logits and greedy chat decoding equal ``transformers``', HF -> export -> HF is the
identity, and LoRA on it: zero adapters change nothing, a few trained steps move only the
adapters, and the PEFT adapter we write gives ``peft`` our logits.

Tolerance (f32, ``TOL``): our model and transformers' compute the same function with sums in
different orders. Each of the ~L * m = 30 * 7 matmuls a token passes contracts ~576..1536
terms, adding ~sqrt(n) * u relative rounding (u = 6e-8); independent, they add as a random
walk: sqrt(210 * 576) * 6e-8 ~ 2e-5 relative error in the final hidden state, i.e. ~2e-4 on
logits of RMS ~9 (the chat prompt's; max ~38), so 5e-4 holds with room and a mis-mapped
weight (an O(1) change) cannot pass.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from rlhf_jax import convert, parameters, sharding, steps  # noqa: E402
from rlhf_jax.config import LoRAConfig, MeshConfig, SamplingConfig  # noqa: E402
from rlhf_jax.models import LanguageModel, lora  # noqa: E402
from rlhf_jax.models.hf_config import model_config_from_hf  # noqa: E402
from rlhf_jax.models.peft import export_peft  # noqa: E402
from rlhf_jax.sampling import make_sampler  # noqa: E402
from rlhf_jax.types import TokenBatch  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 5e-4  # derived in the module docstring
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    """(directory, config, our params, tokenizer, transformers model) on one device."""
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    cfg = model_config_from_hf(smollm2_dir)
    params, _ = parameters.load(str(smollm2_dir), LanguageModel(cfg), mesh, "smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return smollm2_dir, cfg, mesh, params, tokenizer, hf_model


def _chat_prompt(tokenizer):
    """``[1, P]`` ids of the chat-templated question with the assistant turn opened."""
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)
    return np.asarray(ids["input_ids"], np.int32)[None]


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


def test_the_architecture_is_smollm2(smollm2):
    _, cfg, _, params, tokenizer, _ = smollm2
    assert (cfg.family, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.vocab_size, cfg.tie_embeddings,
            cfg.rope_theta) == ("llama", 30, 576, 9, 3, 49152, True, 100000.0)
    assert lora.count_params(params) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.chat_template


def test_logits_match_transformers(smollm2):
    _, cfg, _, params, tokenizer, hf_model = smollm2
    tokens = _chat_prompt(tokenizer)
    ours, _ = jax.jit(LanguageModel(cfg).apply)({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf_model, tokens), atol=TOL, rtol=0)


def test_greedy_chat_decoding_matches_generate(smollm2):
    _, cfg, mesh, params, tokenizer, hf_model = smollm2
    prompt = _chat_prompt(tokenizer)
    new = 12
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(prompt.astype(np.int64)), max_new_tokens=new, do_sample=False,
                                output_scores=True, return_dict_in_generate=True)
    theirs = out.sequences[0, prompt.shape[1]:].numpy()
    top2 = np.sort(torch.stack(out.scores)[:, 0].numpy(), axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 4 * TOL, "a near-tie in argmax would make the comparison luck"
    sampler = make_sampler(LanguageModel(cfg), SamplingConfig(max_new_tokens=new, temperature=0.0), mesh,
                           parameters.shardings_of(params), tokenizer.eos_token_id, tokenizer.pad_token_id)
    samples = sampler(params, jnp.asarray(prompt), jnp.ones_like(prompt), jax.random.PRNGKey(0))
    ours = np.asarray(samples.tokens[0])[np.asarray(samples.mask[0])]
    np.testing.assert_array_equal(ours, theirs)
    assert tokenizer.decode(ours, skip_special_tokens=True).strip()  # it answers something


def test_export_round_trips_to_hf(smollm2, tmp_path):
    directory, _, mesh, _, tokenizer, _ = smollm2
    convert.from_hf(directory, tmp_path / "export", mesh)
    convert.to_hf(tmp_path / "export", tmp_path / "hf", mesh, str(directory))
    from safetensors.numpy import load_file

    original, again = load_file(directory / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert set(again) == set(original) - {"lm_head.weight"}  # tied: the embedding is the head
    for name, tensor in again.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)
    assert model_config_from_hf(tmp_path / "hf") == dataclasses.replace(model_config_from_hf(directory),
                                                                       hf_path=str(tmp_path / "hf"))
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert reloaded.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)


def test_lora_adapters_train_alone_and_load_in_peft(smollm2, tmp_path):
    """Rank 16 on every projection: fresh adapters leave the logits exactly as they were; three
    SFT steps move only the adapters; the PEFT adapter we write gives peft our logits."""
    directory, cfg, mesh, base, tokenizer, _ = smollm2
    lora_cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=16, alpha=32.0, target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    model = LanguageModel(lora_cfg)
    params, _ = parameters.load(str(directory), model, mesh, "smollm2", adapter_rng=jax.random.PRNGKey(1))
    prompt = jnp.asarray(_chat_prompt(tokenizer))
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    np.testing.assert_array_equal(np.asarray(apply(params, prompt)),  # B = 0: the adapters add exact zeros
                                  np.asarray(jax.jit(LanguageModel(cfg).apply)({"params": base}, prompt)[0]))

    tx = optax.adam(1e-3)
    state, state_sh = steps.create_train_state(model, tx, mesh, jax.random.PRNGKey(0), params)
    trainable = lora.split_trainable(state.params)[0]
    # 30 layers x (q 18432 + k 12288 + v 12288 + o 18432 + gate, up, down 33792 each) = 4,884,480
    assert lora.count_params(trainable) == 4_884_480
    assert lora.count_params(trainable) <= 0.05 * lora.count_params(base)  # 3.6%
    assert lora.tree_bytes(state.opt_state) <= 2 * 4 * 4_884_480 + 64  # Adam's mu and nu, f32, + its count
    answer = tokenizer("Paris is the capital of France.<|im_end|>", add_special_tokens=False)["input_ids"]
    row = np.concatenate([np.asarray(prompt[0]), answer]).astype(np.int32)
    tokens = jnp.asarray(np.stack([row, row]))
    mask = jnp.asarray(np.stack([np.arange(len(row)) >= prompt.shape[1]] * 2).astype(np.float32))
    batch = TokenBatch(tokens, mask, jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(len(row)), tokens.shape))
    step = steps.make_sft_step(model, tx, mesh, state_sh)
    for _ in range(3):
        state, metrics = step(state, batch)
    trained, frozen = lora.split_trainable(state.params)
    # the frozen part is still the checkpoint's weights, bit for bit (the fixture's own load of them)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), frozen, base)
    assert all(float(jnp.abs(b).max()) > 0 for b in jax.tree.leaves(lora.adapter_params(trained)))

    adapter = export_peft(state.params, lora_cfg, tmp_path / "adapter", str(directory))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 16, 32.0)
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_model, adapter).eval()
    ours = np.asarray(apply(state.params, tokens))
    np.testing.assert_allclose(ours, _hf_logits(with_adapter, tokens), atol=TOL, rtol=0)
