"""Selection methods of ``refed-ray select``: each returns a keep/drop decision and a reason per
sample (``decisions.py`` says what a method is given and returns)."""
