"""The flaw detector (GenRM) side of FAPO: which rollouts reach the right answer through a wrong step.

prompt.py        the step split (shared by GenRM training and querying) and the ProcessBench/FAPO prompt
verdict.py       last-`\\boxed{}` index parsing, range-checked, never evaluated
types.py         JudgeRequest, Verdict (+ status), JudgeCounts, the Judge protocol, tensors for fapo_rewards
transports.py    engine / OpenAI chat / SGLang /generate transports
client.py        GenRMClient: concurrency, per-request timeout, batch deadline, retries with backoff
program_judge.py exact step checker for the arithmetic-chain task (same interface)
build.py         build_judge(cfg.genrm, engine): the judge a config asks for
reward.py        the GenRM's own RL reward (step distance)
task.py          the GenRM training task: step-labelled prompts, responses scored against the labels
processbench.py  ProcessBench-format data and ProcessBench / FlawedPositiveBench metrics
"""
