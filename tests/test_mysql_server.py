"""The tests' own fallback: a throwaway MariaDB for machines that have no server running."""

from __future__ import annotations

from tests.mysql_server import throwaway_mariadb


def test_a_throwaway_server_starts_answers_and_is_removed():
    with throwaway_mariadb() as server:
        with server.connect() as conn, conn.cursor() as cursor:
            cursor.execute("SELECT @@local_infile, VERSION()")
            local_infile, version = cursor.fetchone()
        assert local_infile == 1
        assert "MariaDB" in version
        folder = server.folder
    assert not folder.exists()
