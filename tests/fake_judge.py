"""Test doubles for the judge (tests only): a fake judge whose preferences a test sets, and a fake
teacher that marks some of its responses, so a test knows which ones such a judge prefers.

``FakeJudge`` reads the two responses out of the judge prompt and answers with engine_kwargs:
- ``prefer_marker``: the response containing this text wins; when both or neither contain it, the
  one shown first wins (so the two orders disagree: a tie);
- ``always``: "1" or "2", whatever the responses (a judge with a position bias);
- ``invalid_marker``: a prompt containing it gets invalid JSON, every time;
- ``calls_log``: a file each call appends a line to.

``MarkedTeacher`` is ``tests.fake_engine.FakeEngine`` whose replies of the schemas in
``engine_kwargs["marks"]`` (``{schema title: every}``) get the text " GOOD" appended to their
response field when the request's seed is divisible by ``every``.
"""

from __future__ import annotations

import json
import re

from refed_ray.engines.base import ChatRequest, Completion, Engine
from refed_ray.engines.config import EngineConfig
from tests.fake_engine import FakeEngine

MARK = "GOOD"
_RESPONSES = re.compile(
    r"\[Response 1\]\n(.*)\n\[End of response 1\].*\[Response 2\]\n(.*)\n\[End of response 2\]", re.S
)
_FIELDS = {"SynthesizedResponse": "response", "Refinement": "improved_response"}


class FakeJudge(Engine):
    def __init__(self, config: EngineConfig):
        self.model_name = config.model or "fake-judge"
        self.options = config.engine_kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        prompt = request.messages[-1]["content"]
        if "calls_log" in self.options:
            with open(self.options["calls_log"], "a") as handle:
                handle.write(f"{request.json_schema.get('title', '')}\n")
        if self.options.get("invalid_marker", "\0") in prompt:
            text = '{"reasoning": "cut'
        else:
            text = json.dumps({"reasoning": "compared both", "better": self._better(prompt)})
        return Completion(text=text, prompt_tokens=len(prompt) // 4, completion_tokens=max(1, len(text) // 4),
                          finish_reason="stop")

    def _better(self, prompt: str) -> str:
        if "always" in self.options:
            return self.options["always"]
        first, second = _RESPONSES.search(prompt).groups()
        marker = self.options["prefer_marker"]
        return "2" if marker in second and marker not in first else "1"


class MarkedTeacher(FakeEngine):
    async def complete(self, request: ChatRequest) -> Completion:
        completion = await super().complete(request)
        title = request.json_schema.get("title", "")
        every = self.options.get("marks", {}).get(title)
        if every and request.seed % every == 0:
            reply = json.loads(completion.text)
            reply[_FIELDS[title]] += f" {MARK}"
            completion = completion.model_copy(update={"text": json.dumps(reply)})
        return completion
