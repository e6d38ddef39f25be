"""Research recipes that produce the project's shipped artefacts; not part of the installed ``cacovid_rl`` package."""
