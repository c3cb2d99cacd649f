"""Interactive chat and one-shot generation from a run dir, adapter dir, or model dir."""

from __future__ import annotations

import sys
from threading import Thread

from tuneforge.data.templates import stop_token_ids
from tuneforge.errors import UserError
from tuneforge.model.generate import generate_batch, prompt_ids


def context_length(model) -> int | None:
    """Positions the model was built for (None when its config does not say)."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(model, n_prompt: int, max_new_tokens: int) -> None:
    """Generating past the model's context is garbage at best and a hang or an overflow at worst: refuse it."""
    limit = context_length(model)
    if limit is not None and n_prompt + max_new_tokens > limit:
        room = limit - n_prompt
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt or the system prompt"
        raise UserError(f"--max-new-tokens {max_new_tokens}: the prompt ({n_prompt} tokens) plus the reply must fit the "
                        f"model's context of {limit} tokens ({fix})")


def generate_once(path: str, prompt: str, system: str | None, max_new_tokens: int, temperature: float) -> str:
    from tuneforge.model.trained import load_trained

    model, tokenizer, _ = load_trained(path)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    check_fits(model, len(prompt_ids(tokenizer, msgs)), max_new_tokens)
    return generate_batch(model, tokenizer, [msgs], max_new_tokens, temperature=temperature)[0]


def chat_loop(path: str, system: str | None, max_new_tokens: int, temperature: float, out=None, inp=None) -> None:
    """Read user lines from `inp`; stream replies to `out`. /reset clears history, /exit quits."""
    out, inp = out or sys.stdout, inp or sys.stdin  # resolved per call: redirected streams are honoured
    import torch
    from transformers import TextIteratorStreamer

    from tuneforge.model.trained import load_trained

    model, tokenizer, _ = load_trained(path)
    history = [{"role": "system", "content": system}] if system else []
    out.write("chat ready: type a message, /reset to clear history, /exit to quit\n")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = torch.tensor([prompt_ids(tokenizer, history)])
        try:
            check_fits(model, ids.shape[1], max_new_tokens)
        except UserError as exc:  # the conversation outgrew the context: say so, keep the session
            history.pop()
            out.write(f"error: {exc} (or /reset the conversation)\n")
            continue
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, streamer=streamer,
                      eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      do_sample=temperature > 0, **({"temperature": temperature} if temperature > 0 else {}))
        worker = Thread(target=model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        out.write("assistant> ")
        reply = ""
        for piece in streamer:
            reply += piece
            out.write(piece)
            out.flush()
        worker.join()
        out.write("\n")
        history.append({"role": "assistant", "content": reply.strip()})
