"""Denied-party screening: list formats and fuzzy matching on realistic name variants."""

from __future__ import annotations

import pytest

from distillguard.errors import ConfigError
from distillguard.policy.screening import ScreeningList, normalise, parse_list

CSL_CSV = b'''_id,source,entity_number,type,programs,name,title,addresses,alt_names
a1,Entity List (EL) - Bureau of Industry and Security,,Entity,,"HUAWEI TECHNOLOGIES CO., LTD.",,"Shenzhen, CN","Huawei; Huawei Technologies Company"
a2,Specially Designated Nationals (SDN) - Treasury Department,7001,Individual,RUSSIA-EO14024,"IVANOV, Sergei Petrovich",,,
a3,Entity List (EL) - Bureau of Industry and Security,,Entity,,Harbin Institute of Technology,,,HIT; Harbin Polytechnic University
a4,Specially Designated Nationals (SDN) - Treasury Department,7002,Entity,RUSSIA-EO14024,"JOINT STOCK COMPANY ROSOBORONEXPORT",,,"ROSOBORONEXPORT OAO; OJSC ROSOBORONEXPORT"
a5,Nonproliferation Sanctions (ISN) - State Department,,Entity,,"Beijing Zhong Guan Cun Nanotech Ltd.",,,
a6,Specially Designated Nationals (SDN) - Treasury Department,7003,Entity,RUSSIA-EO14024,"LIMITED LIABILITY COMPANY SKY SHIELD",,,
a7,Specially Designated Nationals (SDN) - Treasury Department,7004,Entity,RUSSIA-EO14024,"PUBLIC JOINT STOCK COMPANY NORTH PIPE",,,
'''


@pytest.fixture(scope="module")
def lists() -> ScreeningList:
    return ScreeningList(parse_list(CSL_CSV, "csl.csv"))


@pytest.mark.parametrize("name,entry", [
    ("Huawei Technologies Co Ltd", "a1"),
    ("HUAWEI TECHNOLOGIES COMPANY LIMITED", "a1"),
    ("Huawai Technologies", "a1"),                   # a typo
    ("huawei", "a1"),                                # listed alias
    ("Sergey Ivanov", "a2"),                         # transliteration, no patronymic
    ("Ivanov, Sergei P.", "a2"),
    ("Sergei Petrovich Ivanov", "a2"),               # word order
    ("Harbin Institute of Technology", "a3"),
    ("Harbin Polytechnical University", "a3"),
    ("Rosoboronexport JSC", "a4"),
    ("Rosoboronéxport", "a4"),                       # an accent
    ("Beijing Zhongguancun Nanotech", "a5"),         # words run together
    # look-alike letters of other scripts each became a word break, and matched nothing
    ("R\u043es\u043eb\u043er\u043en\u0435\u0445p\u043ert", "a4"),   # Cyrillic о, е, х
    ("\u041d\u0443aw\u0435i T\u0435chn\u043el\u043egi\u0435s", "a1"),  # Н, у, е, о
    ("S\u0435rg\u0435\u0456 \u0406v\u0430n\u03bfv", "a2"),         # Cyrillic, Greek ο
    # a name written wholly in Cyrillic normalised to nothing and was never compared
    ("ОАО «Рособоронэкспорт»", "a4"),
    ("Сергей Петрович Иванов", "a2"),
    ("Иванов Сергей", "a2"),
    # a word wholly in letters that imitate Latin ones was transliterated (НІТ as "nit")
    ("\u041d\u0406\u0422", "a3"),                                   # Cyrillic Н, І, Т
    # legal forms of several words, or written with dots, stayed in the name
    ("Sky Shield LLC", "a6"),
    ("OOO Sky Shield", "a6"),
    ("Sky Shield L.L.C.", "a6"),
    ("North Pipe", "a7"),
    ("North Pipe PJSC", "a7"),
    ("Rosoboronexport Limited Liability Company", "a4"),
    ("Rosoboronexport Sp. z o.o.", "a4"),
    ("Rosoboronexport Gesellschaft mit beschränkter Haftung", "a4"),
    ("\u041d\u057d\u0430\u051d\u0435\u0456 \u0422\u0435\u0441\u04bb\u043e\u04cf\u043e\u0261\u0456\u0435\u0455",
     "a1"),                                                         # no Latin letter
])
def test_variants_match(lists: ScreeningList, name: str, entry: str) -> None:
    found = lists.match(name, threshold=90)
    assert found and found[0].entry.entry_id == entry, (name, found)
    assert found[0].score >= 90


@pytest.mark.parametrize("name", [
    "Acme Robotics Ltd",
    "Huawei Fan Club Berlin e.V.",
    "Harbin Engineering University",                 # a different listed-sounding name
    "Ivan Sergeev",
    "Sergei Ivanova Bakery",
    "Hitachi Ltd",
    "Technologies Co Ltd",                           # only legal form and generic words
    "ООО «Ромашка»",                                 # Cyrillic, unlisted
    "Open Sky LLC",
    "North Star Pipe Fitting Public Company",
    "Shield Limited Liability Company",
    "",
])
def test_non_matches(lists: ScreeningList, name: str) -> None:
    assert lists.match(name, threshold=90) == []


def test_evidence_names_the_list_and_entry(lists: ScreeningList) -> None:
    match = lists.match("Sergey Ivanov", threshold=90, field="name")[0]
    text = match.evidence()
    assert "'Sergey Ivanov'" in text and "IVANOV, Sergei Petrovich" in text
    assert "Specially Designated Nationals" in text and "a2" in text


def test_json_formats_and_errors() -> None:
    ours = b'{"version": 1, "entries": [{"id": "x", "name": "Example Arms Ltd", ' \
           b'"aliases": ["ExArms"], "source": "internal"}]}'
    csl_api = b'{"results": [{"id": "y", "name": "Example Arms", "alt_names": ["EA"]}]}'
    bare = b'[{"name": "Example Arms"}]'
    for raw in (ours, csl_api, bare):
        found = ScreeningList(parse_list(raw, "x.json")).match("EXAMPLE ARMS LIMITED",
                                                                 threshold=90)
        assert found, raw
    for raw, needle in ((b'{"version": 3, "entries": []}', "unsupported version"),
                        (b'[{"alias": "x"}]', "no 'name'"),
                        (b"id,alias\n1,x\n", "'name' column"),
                        (b"{broken", "not valid JSON")):
        with pytest.raises(ConfigError, match=needle):
            parse_list(raw, "bad")


def test_normalise() -> None:
    assert normalise("  The Ürümqi Trading Co., Ltd. ") == "urumqi trading"
    assert normalise("R\u043es\u043eb\u043er\u043en\u0435\u0445p\u043ert") == "rosoboronexport"
    assert normalise("Рособоронэкспорт") == "rosoboroneksport"
    assert normalise("OOO «Romashka»") == "romashka"
    assert normalise("Limited Liability Company Sky-Shield") == "sky shield"
    assert normalise("Sky Shield L.L.C.") == normalise("S K Y Shield") == "sky shield"
    assert normalise("Public Library Ltd") == "public library"
