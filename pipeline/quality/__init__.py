"""Quality of a fit: previews, their scores, the quality gate over candidate fits, rescoring a library."""
