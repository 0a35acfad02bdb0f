"""The loop's steps, peers with plain inputs: none receives the job run.

- `text.make_text`: one executor call and its stored artifact (text and code jobs);
- `media.make_media`: one generated image, clip or video, stored, and what the evaluator is shown of it;
- `check.check`: the job's deterministic checks on one artifact;
- `judge.judge`: the evaluator's verdict on one artifact, with one repair call for an unreadable reply.

Each paid call goes through `common.PaidCalls`; each making step returns a `common.Made`.
"""
