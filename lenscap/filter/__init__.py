"""``lenscap filter``: cheap rules, then content annotators; every drop explained."""
