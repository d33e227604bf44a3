"""Evaluation: the numbers users decide on (:mod:`.metrics`) and the HTML/JSON report (:mod:`.report`)."""
