"""The real-model path on CPU: an instruct-style tiny Gemma2 with a chat template, a JumpReLU SAE in
sae-lens format, the study's task prompts, generated tests run in the sandbox, MMLU as general ability,
and the probe trained the study's way (sampled contrastive generations)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import torch

from recipes import regex
from sieve.results import ResultStore

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_instruct_recipe_end_to_end(tmp_path, tiny_dirs, tiny_tokenizer):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from transformers import Gemma2ForCausalLM

    from sieve.saes import save_sae

    model_dir = tmp_path / "gemma2-it"
    Gemma2ForCausalLM.from_pretrained(tiny_dirs["gemma2"]).save_pretrained(model_dir)
    tok = tiny_tokenizer
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=128, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.threshold.fill_(0.1)
    save_sae(sae, tmp_path / "sae")
    recipe = tmp_path / "r.toml"
    for f in ("prompts/regex_task.toml", "data/mmlu_fixture.json"):  # a recipe reads inputs from its own folder
        shutil.copy(ROOT / "recipes" / f, tmp_path / Path(f).name)
    recipe.write_text(f'''
name = "instruct-cpu"
[model]
source = "{model_dir}"
chat = true
[sae]
source = "{tmp_path / 'sae'}"
layer = 1
feature = 3
[probe]
data = "generations"
samples = 1
max_new_tokens = 8
[prompts]
source = "regex_task.toml"
regex_limit = 3
neutral_limit = 2
[sweep]
methods = ["unsteered", "conditional_per_token", "probe_sae", "constant_steering_vector"]
samples = 1
max_new_tokens = 12
stop = ["```"]
[sweep.scales]
add = [-4.0]
[eval]
execute = true
timeout_s = 2.0
general = "mmlu"
mmlu_data = "mmlu_fixture.json"
[output]
dir = "{tmp_path / 'out'}"
charts = false
''')
    assert regex.main([str(recipe), "--no-progress"]) == 0
    gen = ResultStore(tmp_path / "out" / "gen").table()
    assert gen.height == 4 * (3 + 2)
    rx = gen.filter(pl.col("set") == "regex")
    # every regex-set completion was judged by the sandbox (run, or refused as not valid Python)
    assert rx["exec_status"].is_in(["ok", "error", "syntax", "timeout", "killed", "no-result", "no-code", "tampered"]).all()
    assert (gen.filter(pl.col("set") == "neutral")["exec_status"] != "ok").all()
    fenced = gen.filter(pl.col("text").str.contains("```", literal=True))
    assert fenced["finished"].all() and (fenced["text"].str.count_matches("```", literal=True) == 1).all()
    ab = ResultStore(tmp_path / "out" / "ability").table()
    assert ab.height == 4 and (ab["metric"] == "mmlu").all()
    assert all(len(v) == 24 for v in ab["values"].to_list())
    summary = pl.read_parquet(tmp_path / "out" / "summary.parquet")
    assert summary.height == 4


def test_task_prompts_use_the_chat_template_and_prefill(tiny_tokenizer):
    from sieve.prompts import load_prompt_sets
    from sieve.recipe import load_recipe

    tiny_tokenizer.chat_template = TEMPLATE
    r = load_recipe(ROOT / "recipes/regex_gemma2_2b.toml")
    sets = load_prompt_sets(r, tiny_tokenizer)
    p = sets.regex[0]
    assert p.text.startswith("<|endoftext|><start_of_turn>user\n") and p.text.endswith("<start_of_turn>model\n```python\n")
    assert "def extract_emails" in p.text and "{code}" not in p.text and "{documentation}" not in p.text
    assert p.setup.strip().startswith("import re") and p.style == "instruct"
    pos, neg = sets.contrastive
    assert len(pos) == len(neg) == len(sets.regex) and "regular expressions" in pos[0] and "regular expressions" not in neg[0]
