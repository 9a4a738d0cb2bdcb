"""Starting the app: loopback by default, a non-local host needs --auth, and over HTTP the app serves nothing outside
the project, asks for the login, and answers refused requests with a message (never a traceback)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from ui_server import ServedApp, write_photos

from persam_dreambooth.cli import main
from persam_dreambooth.ui.server import check_host, is_loopback, parse_auth


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2", "[::1]"])
def test_loopback_hosts_need_no_password(host):
    assert is_loopback(host)
    check_host(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.org"])
def test_other_hosts_are_refused_without_auth(host):
    assert not is_loopback(host)
    with pytest.raises(ValueError, match="refusing to start without a password.*--auth USER:PASSWORD"):
        check_host(host, None)
    check_host(host, ("alice", "pw"))


@pytest.mark.parametrize("text", ["alice", ":pw", "alice:", ""])
def test_bad_auth_is_refused_without_echoing_it(text):
    with pytest.raises(ValueError, match="`--auth` must be USER:PASSWORD") as info:
        parse_auth(text)
    assert "pw" not in str(info.value).replace("PASSWORD", "")


def test_cli_refuses_a_public_host_without_auth(tmp_path, capsys):
    assert main(["ui", "--project", str(tmp_path / "p"), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "persam-dreambooth ui: error: `--host` '0.0.0.0'" in err and "--auth" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()  # nothing was created


@pytest.mark.parametrize(("argv", "message"), [
    (["--port", "0"], "`--port` must be an integer in [1, 65535]"),
    (["--port", "70000"], "`--port` must be an integer in [1, 65535]"),
    (["--auth", "nopassword"], "`--auth` must be USER:PASSWORD"),
    (["--sam-model", "vit_q"], "`--sam-model` must be one of"),
    (["--sam-checkpoint", "/nonexistent/sam.pth"], "`--sam-checkpoint` file '/nonexistent/sam.pth' does not exist"),
])
def test_cli_validates_its_flags(tmp_path, capsys, argv, message):
    assert main(["ui", "--project", str(tmp_path / "p"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_project_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["ui", "--project", str(tmp_path / "f")]) == 2
    assert "`--project` must be a folder" in capsys.readouterr().err


def test_served_app_login_files_and_messages(project_dir, ui_models, tmp_path):
    from gradio_client import Client

    (project_dir / "secret.txt").write_text("top secret", encoding="utf-8")
    app = ServedApp(project_dir, ui_models["sam"], tmp_path / "app.log", auth=("alice", "s3cret"))
    try:
        # no file outside Gradio's own cache is served: not /etc/passwd, not even the project's own files
        for target in ["/etc/passwd", str(project_dir / "secret.txt"), str(project_dir / "project.json"),
                       f"{project_dir}/.ui/../secret.txt"]:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"{app.url}gradio_api/file={target}", timeout=10)
            assert info.value.code in (401, 403, 404)
        # the API needs the login
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own types for a 401
            Client(app.url, verbose=False).predict("incoming", api_name="/on_import")
        client = Client(app.url, auth=("alice", "s3cret"), verbose=False)
        for value, expected in [("../..", "outside the project folder"), ("/etc", "outside the project folder"),
                                ("incoming", "does not exist in the project folder")]:
            with pytest.raises(Exception) as info:  # noqa: B017 - gradio_client.exceptions.AppError
                client.predict(value, api_name="/on_import")
            assert expected in str(info.value) and "Traceback" not in str(info.value)
        write_photos(project_dir / "incoming", 2)
        client.predict("incoming", api_name="/on_import")
        assert sorted(p.name for p in (project_dir / "photos").iterdir()) == ["photo_0.jpg", "photo_1.jpg"]
    finally:
        app.stop()
    log = app.log.read_text(errors="replace")
    assert "refused: folder '../..' is outside the project folder" in log
