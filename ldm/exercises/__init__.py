"""The graders of the chapters' exercises: each runs a learner's answer and says whether it meets the goal.

Every chapter of the docs ends with two or three exercises, and its notebook has one cell per exercise:
a first attempt (wrong in an instructive way) and a call to the function here that grades it. A grader
returns a `Verdict`, which the notebook shows: passed or not yet, and what was measured against what.
`tests/test_exercises.py` runs a reference solution of every exercise through the same function, so
that every goal stays reachable, and a wrong answer, so that every check can fail.

Two kinds of goals:

- numeric: the answer is a function or a number, compared with what the library computes
  (`check_*`: a DDIM step against `ldm.samplers.ddim_step`, a timestep embedding against
  `ldm.unet.timestep_embedding`, ...);
- on pictures: the answer changes how the shipped shapes model (`ldm.weights.SHIPPED`) generates, and
  `ldm.judge` counts the pictures that show what was asked (`grade_*`). They run on the shipped model
  whatever checkpoint a notebook loaded, because the judge reads only the shapes world.

    from ldm import exercises
    exercises.check_ddim_step(my_ddim_step)      # Verdict(exercise='2.1', passed=True, detail='...')

One file per group of chapters: common.py (Verdict, the shipped model), stages.py (chapters 1-5),
beyond.py (chapters 6-9); every grader is importable as ldm.exercises.<name>.
"""
from ldm.exercises.common import Verdict, generate_from_context, meta_unet, shipped_pipeline
from ldm.exercises.stages import (CONTEXT_PROMPTS, FEW_STEPS_PROMPTS, FIRST_STEPS_PROMPT, STRENGTH_KEEPS,
                                  STRENGTH_PROMPT, STRENGTH_START, check_context, check_ddim_step, check_downsample, check_first_steps,
                                  check_scaling_factor, check_skip_channels, check_strength_range,
                                  check_text_weights, check_timestep_embedding, grade_colour_swap,
                                  grade_few_steps, grade_negative_prompt)
from ldm.exercises.beyond import (CONV_LORA_MODULE, FAMILY_RULE_NAMES, check_conv_lora_merge, check_ema, check_emphasis, check_family_rule,
                                  check_head_dim_split, check_lr_schedule, check_online_softmax,
                                  check_v_prediction)

__all__ = ["CONTEXT_PROMPTS", "FEW_STEPS_PROMPTS", "FIRST_STEPS_PROMPT", "STRENGTH_KEEPS", "STRENGTH_PROMPT",
           "STRENGTH_START", "CONV_LORA_MODULE", "FAMILY_RULE_NAMES", "Verdict", "shipped_pipeline", "generate_from_context", "meta_unet",
           "check_context", "grade_colour_swap",
           "check_ddim_step", "check_first_steps", "grade_few_steps",
           "check_skip_channels", "check_timestep_embedding", "check_text_weights",
           "check_scaling_factor", "check_downsample",
           "grade_negative_prompt", "check_strength_range",
           "check_online_softmax", "check_head_dim_split",
           "check_lr_schedule", "check_ema",
           "check_conv_lora_merge", "check_emphasis",
           "check_v_prediction", "check_family_rule"]
