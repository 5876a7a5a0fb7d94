"""A small interactive loop: type a prompt, watch the reply stream in; empty line quits.

    .venv/bin/python client_examples/chat_loop.py [--url localhost:8001] [--history]

With --history, earlier turns are sent again as a plain "User:/Assistant:" transcript (the
engine's prefix cache then reuses their KV blocks). The default model knows only Python
source code: it continues a prompt as code, not as a conversation.
"""

from __future__ import annotations

import argparse

from grpc_stream import stream_completion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--history", action="store_true", help="send earlier turns too")
    args = parser.parse_args()
    transcript = ""
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        prompt = f"{transcript}User: {line}\nAssistant:" if args.history else line
        print("llm> ", end="", flush=True)
        reply = stream_completion(
            args.url, args.model, prompt,
            {"max_tokens": args.max_tokens, "temperature": args.temperature, "stop": ["\nUser:"]},
            show_finish=False,
        )
        print()
        transcript = f"{prompt}{reply}\n"


if __name__ == "__main__":
    main()
