"""fd hand-off acceptance tests.

``users`` is both a helper module and a pytest plugin (each test module
names it in ``pytest_plugins``, so its session fixture exists once);
registered here, before anything imports it, so its asserts are rewritten.
"""

import pytest

pytest.register_assert_rewrite("tests.handoff.users")
