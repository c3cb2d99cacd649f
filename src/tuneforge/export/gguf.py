"""`tuneforge export --format gguf`: one GGUF file + an Ollama Modelfile, proven against the trained model.

The file is read back by an independent reader (transformers' GGUF loader, which shares no code with
our writer except the `gguf` package's name table) and compared with the trained model: logits on the
run's saved eval samples, token ids of a chat prompt rendered with the *embedded* chat template, and
the greedy answer to held-out prompts. The numbers go into export_report.json and the folder marker.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.export.gguf_writer import TYPES, write_gguf
from tuneforge.outputs import check_output_dir, mark_output_dir
from tuneforge.rundir import write_json

# Max |logit diff| relative to the largest |logit|, per type; plus the greedy answers must agree (see below).
# q4_k_m: 0.19 (transformers) / 0.21 (llama.cpp) measured on the demo run (SmolLM2-135M + LoRA, whose 576-wide rows
# fall back to q5_0); for 4-bit types the greedy answers are the real gate.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2, "q4_k_m": 0.3}
# Types whose greedy answers must equal the trained model's exactly; quantized ones need this share of them.
EXACT_ANSWERS = ("f32", "f16")
MIN_ANSWER_AGREEMENT = 0.5
LLAMA_QUANTIZE = "llama-quantize"  # llama.cpp's quantizer (k-quants such as q4_k_m)


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def available_types() -> list[str]:
    return list(TYPES) + (["q4_k_m"] if shutil.which(LLAMA_QUANTIZE) or llama_cpp_installed() else [])


def export_gguf(path: str, out: str | None = None, ftype: str = "f16", overwrite: bool = False, log=print) -> dict:
    if ftype not in available_types():
        hint = f" (q4_k_m needs llama.cpp: `pip install 'tuneforge[llamacpp]'` or `{LLAMA_QUANTIZE}` on PATH)" if ftype == "q4_k_m" else ""
        raise UserError(f"--type {ftype}: not available here; available: {', '.join(available_types())}{hint}")
    run_dir = Path(path)
    out_dir = Path(out) if out else run_dir / f"gguf-{ftype}"
    check_output_dir(out_dir, "gguf", overwrite or out is None, "--overwrite")

    from tuneforge.model.trained import load_trained

    model, tokenizer, desc = load_trained(path, dtype="float32")
    return export_loaded(model, tokenizer, desc, run_dir, out_dir, ftype, log)


def export_loaded(model, tokenizer, desc: dict, run_dir: Path, out_dir: Path, ftype: str, log=print) -> dict:
    """Export an already loaded trained model (adapter model or full) after `check_output_dir` passed."""
    from tuneforge.progress import phase

    with phase(f"export gguf {ftype}", total=4, log=log) as progress:  # reference, write, two readers
        return _export(model, tokenizer, desc, run_dir, out_dir, ftype, log, progress)


def _export(model, tokenizer, desc: dict, run_dir: Path, out_dir: Path, ftype: str, log, progress) -> dict:
    from tuneforge.export import parity

    samples = parity.sample_ids(run_dir, tokenizer)
    prompts = parity.held_out_prompts(run_dir)
    ref_logits = parity.logits(model, samples)
    ref_answers = parity.greedy(model, tokenizer, prompts)
    progress.advance(note="reference answers")
    if desc["kind"] == "lora":
        model = model.merge_and_unload()  # GGUF holds full weights: the adapter is fused in memory first

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    mark_output_dir(tmp, "gguf", source=str(run_dir), type=ftype)
    name = run_dir.resolve().name
    gguf_file = tmp / f"{name}-{ftype}.gguf"
    t0 = time.time()
    write_type = "f16" if ftype == "q4_k_m" else ftype
    write_gguf(model, tokenizer, gguf_file, write_type, name, extra={"source": str(run_dir), "finetune": desc["kind"]})
    if ftype == "q4_k_m":
        gguf_file = llama_quantize(gguf_file, ftype)
    log(f"wrote {gguf_file.name} ({gguf_file.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s; reading it back")
    del model
    progress.advance(note="written")

    report = {"type": ftype, "file": gguf_file.name, "reader": "transformers GGUF loader",
              **readback(gguf_file, tokenizer, samples, ref_logits, prompts, ref_answers)}
    report["tolerance_rel"] = TOLERANCE[ftype]
    progress.advance(note="read back by transformers")
    report["llama_cpp"] = llama_cpp_readback(gguf_file, tokenizer, samples, ref_logits, prompts, ref_answers)
    progress.advance(note="read back by llama.cpp")
    report["passed"] = passed(report, ftype)
    report["modelfile_template_matches"] = write_modelfile(tmp, gguf_file.name, tokenizer)
    write_json(tmp / "export_report.json", report)
    parity.publish(tmp, out_dir, run_dir, kind="gguf", info_key=f"gguf_{ftype}", report=report, report_file="export_report.json",
                   what=f"GGUF {ftype}", failure=failure(report, ftype))
    return {**report, "out": str(out_dir), "path": str(out_dir / report["file"])}


def readback(gguf_file: Path, tokenizer, samples, ref_logits, prompts, ref_answers) -> dict:
    """Load the file with transformers (model, tokenizer, embedded chat template) and compare."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.export import parity

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        back_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ValueError as exc:  # e.g. an architecture transformers cannot read from GGUF (Gemma 1)
        return {"readback": f"unavailable: {str(exc).splitlines()[0]}"}
    back.eval()
    result = parity.compare(ref_logits, parity.logits(back, samples))
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in prompts]
    embedded = [back_tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in prompts]
    result["chat_template_embedded"] = back_tok.chat_template == tokenizer.chat_template
    result["prompt_ids_equal"] = all(tokenizer(t, add_special_tokens=False)["input_ids"] == back_tok(e, add_special_tokens=False)["input_ids"]
                                     for t, e in zip(texts, embedded))
    answers = parity.greedy(back, back_tok, prompts)  # through the GGUF's own tokenizer and template
    result["answers"] = [{"prompt": c[-1]["content"], "trained": a, "gguf": b} for c, a, b in zip(prompts, ref_answers, answers)]
    result["answer_agreement"] = sum(a == b for a, b in zip(ref_answers, answers)) / max(1, len(answers))
    result["readback"] = "ok"
    return result


def llama_cpp_readback(gguf_file: Path, tokenizer, samples, ref_logits, prompts, ref_answers) -> dict:
    """llama.cpp itself (the engine of llama-cli and Ollama) reads the file: logits, prompt ids rendered by its
    own Jinja2 formatter from the *embedded* template and tokenized by llama.cpp, and greedy answers."""
    if not llama_cpp_installed():
        return {"readback": "not installed (pip install 'tuneforge[llamacpp]')"}
    import llama_cpp
    import numpy as np
    import torch
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tuneforge.export import parity

    want = [tokenizer(tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for c in prompts]
    n_ctx = max(256, max(map(len, samples + want)) + parity.GREEDY_TOKENS + 8)
    f32 = llama_cpp.GGML_TYPE_F32  # an f32 KV cache (llama.cpp defaults to f16): the check measures the file, not the cache
    try:
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, type_k=f32, type_v=f32)
    except ValueError as exc:  # an architecture this llama.cpp build cannot load
        return {"readback": f"unavailable: {exc}"}
    logits = []
    for ids in samples:
        llm.reset()
        llm.eval(ids)
        logits.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))[None])
    result = {**parity.compare(ref_logits, logits), "readback": "ok"}
    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return {**result, "chat_template_embedded": False}
    special = {k: llm.detokenize([t], special=True).decode("utf-8", "replace") if t >= 0 else ""
               for k, t in (("bos_token", llm.token_bos()), ("eos_token", llm.token_eos()))}
    formatter = Jinja2ChatFormatter(template, **special)
    got = [llm.tokenize(formatter(messages=c).prompt.encode("utf-8"), add_bos=False, special=True) for c in prompts]
    # Greedy from the trained prompt ids, so a template mismatch is reported once, by prompt_ids_equal.
    answers = [llama_cpp_greedy(llm, ids, tokenizer) for ids in want]
    return {**result, "chat_template_embedded": template == tokenizer.chat_template, "prompt_ids_equal": got == want,
            "answer_agreement": sum(a == b for a, b in zip(ref_answers, answers)) / max(1, len(answers)),
            "answers": [{"trained": a, "llama_cpp": b} for a, b in zip(ref_answers, answers)]}


def llama_cpp_greedy(llm, prompt_ids: list[int], tokenizer) -> str:
    """Greedy tokens from llama.cpp until a stop token of the chat template, decoded like `generate_batch` does."""
    from tuneforge.data.templates import stop_token_ids
    from tuneforge.export.parity import GREEDY_TOKENS

    stops, out = {*stop_token_ids(tokenizer), llm.token_eos()}, []
    for tok in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        if tok in stops or len(out) == GREEDY_TOKENS:
            break
        out.append(tok)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def passed(report: dict, ftype: str) -> bool:
    return failure(report, ftype) is None


def failure(report: dict, ftype: str) -> str | None:
    for reader, part in (("transformers", report), ("llama.cpp", report.get("llama_cpp") or {})):
        if part.get("readback") != "ok":
            continue  # nothing to compare with; the report says why
        why = reader_failure(part, report["tolerance_rel"], ftype)
        if why:
            return f"{reader}: {why}"
    return None


def reader_failure(part: dict, tolerance: float, ftype: str) -> str | None:
    if part["max_rel_logit_diff"] > tolerance:
        return f"max relative |logit diff| {part['max_rel_logit_diff']:.3g} > {tolerance:g}"
    if not part["chat_template_embedded"] or not part["prompt_ids_equal"]:
        return "the embedded tokenizer/chat template does not reproduce the trained prompt ids"
    need = 1.0 if ftype in EXACT_ANSWERS else MIN_ANSWER_AGREEMENT
    if part["answer_agreement"] < need:
        return f"greedy answers agree on {part['answer_agreement']:.0%} of prompts (need {need:.0%})"
    return None


def llama_quantize(f16_file: Path, ftype: str) -> Path:
    """k-quants by llama.cpp's own quantizer: the `llama-quantize` binary, else llama-cpp-python's binding of it."""
    import subprocess

    out = f16_file.with_name(f16_file.name.replace("-q4_k_m.gguf", "") + f"-{ftype}.gguf")
    src = f16_file.rename(f16_file.with_suffix(".f16.tmp"))
    try:
        if shutil.which(LLAMA_QUANTIZE):
            proc = subprocess.run([shutil.which(LLAMA_QUANTIZE), str(src), str(out), ftype.upper()], capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"{LLAMA_QUANTIZE} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        else:
            import ctypes
            import os

            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
            params.nthread = os.cpu_count() or 1
            if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
                raise UserError(f"llama.cpp could not quantize {src.name} to {ftype}")
    finally:
        src.unlink()
    return out


# ---- Ollama ------------------------------------------------------------------------------------------
def write_modelfile(folder: Path, gguf_name: str, tokenizer) -> bool:
    """Write the Modelfile; -> whether its template renders test conversations exactly like the chat template."""
    from tuneforge.data.templates import stop_token_ids

    pieces = template_pieces(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(pieces)}"""', *[f'PARAMETER stop "{s}"' for s in stops], "PARAMETER temperature 0"]
    (folder / "Modelfile").write_text("\n".join(lines) + "\n")
    return template_reproduces(tokenizer, pieces)


def template_pieces(tokenizer) -> dict:
    """The Jinja chat template cut into the strings an Ollama (Go) template needs, found by rendering markers.

    Renders [user X], [user X, assistant Y, user Z] and [system S, user X]; the text around the markers
    gives the start (BOS...), the user prefix, what follows a user turn (incl. the assistant header), and
    what follows an assistant turn. A template that folds the system prompt into the user turn gets no
    system block (the Modelfile then ignores SYSTEM).
    """
    x, y, z, s = "\x01X\x01", "\x01Y\x01", "\x01Z\x01", "\x01S\x01"

    def render(msgs):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    head, after_user = render([{"role": "user", "content": x}]).split(x)
    two = render([{"role": "user", "content": x}, {"role": "assistant", "content": y}, {"role": "user", "content": z}])
    between = two.split(y)[1].split(z)[0]
    before_answer = two.split(x)[1].split(y)[0]  # user suffix + assistant header inside a history (may differ: " [/INST] ")
    u_pre = common_suffix(head, between, tokenizer.all_special_tokens)
    pieces = {"start": head[: len(head) - len(u_pre)], "user_prefix": u_pre, "after_user": after_user,
              "assistant_prefix": before_answer[len(after_user):] if before_answer.startswith(after_user) else "",
              "after_assistant": between[: len(between) - len(u_pre)], "system": ""}
    try:
        sys_head = render([{"role": "system", "content": s}, {"role": "user", "content": x}]).split(x)[0]
        if sys_head.endswith(u_pre) and s in sys_head[: len(sys_head) - len(u_pre)]:
            pieces["system"] = sys_head[: len(sys_head) - len(u_pre)].replace(s, "{{ .System }}")
    except Exception:  # noqa: BLE001 - templates may reject a system role; then there is no system block
        pass
    return pieces


def go_template(p: dict) -> str:
    opening = f"{{{{ if .System }}}}{p['system']}{{{{ else }}}}{p['start']}{{{{ end }}}}" if p["system"] else p["start"]
    return (opening + '{{- range .Messages }}{{ if eq .Role "user" }}' + p["user_prefix"] + "{{ .Content }}" + p["after_user"]
            + '{{ else if eq .Role "assistant" }}' + p["assistant_prefix"] + "{{ .Content }}" + p["after_assistant"] + "{{ end }}{{ end }}")


def render_go(p: dict, messages: list[dict]) -> str:
    """What Ollama's template produces for `messages` (our template has this one fixed shape)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    out = p["system"].replace("{{ .System }}", system) if system and p["system"] else p["start"]
    for m in messages:
        if m["role"] == "user":
            out += p["user_prefix"] + m["content"] + p["after_user"]
        elif m["role"] == "assistant":
            out += p["assistant_prefix"] + m["content"] + p["after_assistant"]
    return out


def template_reproduces(tokenizer, p: dict) -> bool:
    convs = [[{"role": "user", "content": "hi there"}],
             [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"}, {"role": "user", "content": "c d"}]]
    if p["system"]:
        convs.append([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    return all(render_go(p, c) == tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs)


def common_suffix(a: str, b: str, atoms: list[str]) -> str:
    """Longest common suffix that never starts inside a special token ("<s>" vs "</s>" share "s>", not a token)."""
    import re

    pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(atoms, key=len, reverse=True)) + ")") if atoms else None

    def pieces(text: str) -> list[str]:
        parts = pattern.split(text) if pattern else [text]
        return [p for part in parts for p in ([part] if part in atoms else list(part))]

    pa, pb, n = pieces(a), pieces(b), 0
    while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
        n += 1
    return "".join(pa[len(pa) - n :])
