"""Rendering of the compliance commands' results: text, JSON, SARIF 2.1.0, markdown, HTML, JUnit XML.

The logic (policy.lint, policy.surface, policy.cases) returns data; these modules only
turn it into text. `common` holds what every command shares (parser set-up with
examples, writing output, error messages).
"""
