"""A small writing world where every Writing-Zero claim can be checked: a task with a hidden
rubric quality (`world`), preference pairs with label noise and a length confound, and a rubric
teacher that writes pairwise judge traces (`teacher`)."""
