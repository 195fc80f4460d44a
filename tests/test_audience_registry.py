"""The resident registry: CSV import keeps good rows and names bad ones; the generator is deterministic."""

from __future__ import annotations

import json

from tests.conftest import Project

HEADER = "phone,name,district,grid,segments,language,opted_out\n"


def test_import_reports_each_bad_row_keeps_good_rows_and_exits_2(project: Project) -> None:
    csv_path = project.write(
        "var/residents.csv",
        HEADER
        + "13812345678,张伟,横林镇,HL-01,workers;parents,zh-CN,false\n"  # line 2 ok
        + "12345,李娜,横林镇,HL-01,workers,zh-CN,false\n"  # line 3 bad phone
        + "13912345678,王芳,武进区,HL-01,workers,zh-CN,false\n"  # line 4 unknown district
        + "13712345678,刘洋,遥观镇,HL-02,workers,zh-CN,false\n"  # line 5 grid of another district
        + "13612345678,陈静,遥观镇,YG-02,astronauts,zh-CN,false\n"  # line 6 unknown segment
        + "13512345678,杨磊,遥观镇,YG-02,retirees,zh-CN,maybe\n"  # line 7 bad flag
        + "13512345679,黄勇,遥观镇,YG-02\n"  # line 8 short row
        + "+86 150 1234 5678,赵敏,潞城街道,LC-03,退休人员,zh-CN,否\n"  # line 9 ok (Chinese segment name)
        + "15012345678,赵敏二,潞城街道,LC-03,retirees,zh-CN,false\n",  # line 10 duplicate of line 9
    )
    result = project.dispatch("audience", "import", str(csv_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["3", "4", "5", "6", "7", "8"]
    assert all(e.startswith(f"{csv_path}:") for e in errors)
    assert "phone" in errors[0] and "district" in errors[1] and "grid" in errors[2]
    assert "segments" in errors[3] and "opted_out" in errors[4]
    assert "12345" not in result.stderr.replace("123****", ""), "numbers in errors are masked"
    stats = json.loads(project.dispatch("audience", "stats", "--json").stdout)
    assert stats["by_district"] == {
        "henglin": {"residents": 1, "opted_out": 0},
        "lucheng": {"residents": 1, "opted_out": 0},
    }
    assert stats["by_district_segment"]["lucheng"] == {"retirees": 1}
    assert "1 duplicate" in result.stdout


def test_reimport_updates_residents_by_phone(project: Project) -> None:
    csv_path = project.write("var/a.csv", HEADER + "13812345678,张伟,横林镇,HL-01,workers,zh-CN,false\n")
    assert project.dispatch("audience", "import", str(csv_path)).returncode == 0
    csv_path.write_text(HEADER + "138 1234 5678,张伟,遥观镇,YG-01,retirees,zh-CN,true\n", encoding="utf-8")
    assert project.dispatch("audience", "import", str(csv_path)).returncode == 0
    stats = json.loads(project.dispatch("audience", "stats", "--json").stdout)
    assert stats["by_district"] == {"yaoguan": {"residents": 1, "opted_out": 1}}
    assert stats["by_district_segment"] == {"yaoguan": {"retirees": 1}}


def test_generator_is_deterministic_and_importable(project: Project) -> None:
    a = project.dispatch("audience", "generate", "--size", "3000", "--seed", "42")
    b = project.dispatch("audience", "generate", "--size", "3000", "--seed", "42")
    c = project.dispatch("audience", "generate", "--size", "3000", "--seed", "43")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert a.stdout != c.stdout
    lines = a.stdout.splitlines()
    assert lines[0] == HEADER.strip() and len(lines) == 3001
    csv_path = project.write("var/gen.csv", a.stdout)
    result = project.dispatch("audience", "import", str(csv_path))
    assert result.returncode == 0, result.stderr
    stats = json.loads(project.dispatch("audience", "stats", "--json").stdout)
    assert sum(v["residents"] for v in stats["by_district"].values()) == 3000
    assert set(stats["by_district"]) == {"henglin", "yaoguan", "hengshanqiao", "lucheng", "dingyan", "qishuyan"}
    # a realistic mix: every group of the plan is represented, women about half
    segments = {s for cells in stats["by_district_segment"].values() for s in cells}
    assert {"retirees", "students", "parents", "accountants", "party_members", "women"} <= segments
    women = sum(cells.get("women", 0) for cells in stats["by_district_segment"].values())
    assert 1200 < women < 1700


def test_import_of_a_missing_file_is_an_input_error(project: Project) -> None:
    result = project.dispatch("audience", "import", "var/nope.csv")
    assert result.returncode == 2
    assert result.stderr.strip() == "var/nope.csv: file not found"
