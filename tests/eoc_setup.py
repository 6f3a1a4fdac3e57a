"""What the session's EOC prior (tests/conftest.py `eoc_prior`) was calibrated for: a module of its
own, since `conftest` names two modules in this tree."""

EOC_STEPS = 6  # sampling steps of the session's EOC prior (tests/test_eoc.py and its pass and method tests)
