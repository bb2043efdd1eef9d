"""Run the chat app headless on a model and ask one long question, until killed.

Used by tests/test_crash.py: the test kills this process with SIGKILL while the answer streams and
then checks the history it leaves behind. A script (not a fixture) because the app must die for
real, with its files open, as it would at an OOM kill or a power cut of the terminal.

    python tests/crash_driver.py MODEL_DIR DOC QUESTION
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch


async def main(model_dir: str, doc: str, question: str) -> None:
    from triforce_chat.app.settings import Settings
    from triforce_chat.app.ui.app import TriforceApp
    from triforce_chat.app.ui.widgets import ChatInput
    from triforce_chat.decoding.models.loading import load_model

    torch.set_num_threads(1)
    lm = load_model(model_dir, dtype=torch.float32)
    forward = lm.model.forward

    def slow_forward(*args, **kwargs):  # a few tokens a second: the kill lands mid-answer
        time.sleep(0.05)
        return forward(*args, **kwargs)

    app = TriforceApp(Settings(max_new_tokens=1000, level=2, budget="64"), [doc], model=lm)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.session is None or app.busy:
            await pilot.pause(0.05)
        lm.model.forward = slow_forward
        app.query_one(ChatInput).insert(question)
        await pilot.press("enter")
        print("asked", flush=True)
        while True:
            await pilot.pause(0.1)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
