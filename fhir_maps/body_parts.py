"""Body Part Examined (0018,0015) → SNOMED CT, per DICOM PS3.16 Annex L.

Source: DICOM PS3.16 (current edition) Annex L "Correspondence of Anatomic Region Codes and
Body Part Examined Defined Terms", Table L-1
(https://dicom.nema.org/medical/dicom/current/output/chtml/part16/chapter_L.html). Each row
gives the SNOMED CT concept (Coding Scheme Designator SCT) and Code Meaning for one Body Part
Examined defined term. The codes below include the CP 1962 replacements (ABDOMEN 818981001,
ABDOMENPELVIS 818982008, PELVIS 816092008) and the newer spine-segment and
PELVISLOWEXTREMT concepts.

Scope: all terms of CID 4031 "Common Anatomic Region" (the regions equipment puts in Body
Part Examined) plus the organs, bones and regions of Table L-1 that imaging devices commonly
send; the rarer vessel and endoscopic terms are not listed yet. The NEMA page itself could
not be fetched while this was written, so every row was taken from independent
transcriptions of Table L-1 and kept only where at least two agreed on term and code (one
disagreement, DESCAORTA, is therefore left out). A term not in the table gives no
``bodySite``: the mapping never guesses from similar words (``LEG``, ``ARM``, free text).

FHIR: R4 ``ImagingStudy.series.bodySite`` is a Coding, R5 a CodeableReference(BodyStructure)
whose ``concept`` holds it; the element definition points to this Annex for the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from fhir_maps.dicom_values import clean_text
from fhir_maps.facts import CodedConcept
from fhir_maps.terminology import SNOMED

_SCTID = re.compile(r"[1-9][0-9]{5,17}")

#: Body Part Examined defined term → (SNOMED CT concept id, PS3.16 Code Meaning).
BODY_PART_EXAMINED: Mapping[str, tuple[str, str]] = {
    # --- CID 4031 Common Anatomic Region --------------------------------------------------
    "ABDOMEN": ("818981001", "Abdomen"),
    "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ACJOINT": ("85856004", "Acromioclavicular joint"),
    "ANKLE": ("70258002", "Ankle joint"),
    "BILEDUCT": ("28273000", "Bile duct"),
    "BILIARYTRACT": ("34707002", "Biliary tract"),
    "BLADDER": ("89837001", "Bladder"),
    "BREAST": ("76752008", "Breast"),
    "BRONCHUS": ("955009", "Bronchus"),
    "CALCANEUS": ("80144004", "Calcaneus"),
    "CHEST": ("43799004", "Chest"),
    "CHESTABDOMEN": ("416550000", "Chest and Abdomen"),
    "CHESTABDPELVIS": ("416775004", "Chest, Abdomen and Pelvis"),
    "CLAVICLE": ("51299004", "Clavicle"),
    "COCCYX": ("64688005", "Coccyx"),
    "COLON": ("71854001", "Colon"),
    "COMMONBILEDUCT": ("79741001", "Common bile duct"),
    "CSPINE": ("122494005", "Cervical spine"),
    "CTSPINE": ("1217257000", "Cervico-thoracic spine"),
    "DUODENUM": ("38848004", "Duodenum"),
    "ELBOW": ("16953009", "Elbow joint"),
    "ESOPHAGUS": ("32849002", "Esophagus"),
    "EXTREMITY": ("66019005", "Extremity"),
    "EYE": ("81745001", "Eye"),
    "FEMUR": ("71341001", "Femur"),
    "FIBULA": ("87342007", "Fibula"),
    "FINGER": ("7569003", "Finger"),
    "FOOT": ("56459004", "Foot"),
    "FOREARM": ("14975008", "Forearm"),
    "GALLBLADDER": ("28231008", "Gallbladder"),
    "HAND": ("85562004", "Hand"),
    "HEAD": ("69536005", "Head"),
    "HEADNECK": ("774007", "Head and Neck"),
    "HEART": ("80891009", "Heart"),
    "HIP": ("24136001", "Hip joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "IAC": ("361078006", "Internal Auditory Canal"),
    "ILEUM": ("34516001", "Ileum"),
    "ILIUM": ("22356005", "Ilium"),
    "JAW": ("661005", "Jaw region"),
    "JEJUNUM": ("21306003", "Jejunum"),
    "KNEE": ("72696002", "Knee"),
    "LARGEINTESTINE": ("14742008", "Large intestine"),
    "LARYNX": ("4596009", "Larynx"),
    "LOWERLEG": ("30021000", "Lower leg"),
    "LOWERLIMB": ("61685007", "Lower limb"),
    "LSPINE": ("122496007", "Lumbar spine"),
    "LSSPINE": ("1217253001", "Lumbo-sacral spine"),
    "MANDIBLE": ("91609006", "Mandible"),
    "MASTOID": ("59066005", "Mastoid bone"),
    "MAXILLA": ("70925003", "Maxilla"),
    "MEDIASTINUM": ("72410000", "Mediastinum"),
    "NECK": ("45048000", "Neck"),
    "NECKCHEST": ("417437006", "Neck and Chest"),
    "NECKCHESTABDOMEN": ("416152001", "Neck, Chest and Abdomen"),
    "NECKCHESTABDPELV": ("416319003", "Neck, Chest, Abdomen and Pelvis"),
    "OPTICCANAL": ("55024004", "Optic canal"),
    "ORBIT": ("363654007", "Orbital structure"),
    "PANCBILEDUCT": ("110621006", "Pancreatic duct and bile duct systems"),
    "PANCREAS": ("15776009", "Pancreas"),
    "PANCREATICDUCT": ("69930009", "Pancreatic duct"),
    "PAROTID": ("45289007", "Parotid gland"),
    "PATELLA": ("64234005", "Patella"),
    "PELVIS": ("816092008", "Pelvis"),
    "PELVISLOWEXTREMT": ("1231522001", "Pelvis and lower extremities"),
    "PHANTOM": ("706342009", "Phantom"),
    "PROSTATE": ("41216001", "Prostate"),
    "RECTUM": ("34402009", "Rectum"),
    "RIB": ("113197003", "Rib"),
    "SCAPULA": ("79601000", "Scapula"),
    "SCJOINT": ("7844006", "Sternoclavicular joint"),
    "SELLA": ("42575006", "Sella turcica"),
    "SESAMOID": ("58742003", "Sesamoid bones of foot"),
    "SHOULDER": ("16982005", "Shoulder"),
    "SIJOINT": ("39723000", "Sacroiliac joint"),
    "SKULL": ("89546000", "Skull"),
    "SMALLINTESTINE": ("30315005", "Small intestine"),
    "SPINE": ("421060004", "Spine"),
    "SSPINE": ("54735007", "Sacrum"),
    "STERNUM": ("56873002", "Sternum"),
    "STOMACH": ("69695003", "Stomach"),
    "SUBMANDIBULAR": ("54019009", "Submandibular gland"),
    "THIGH": ("68367000", "Thigh"),
    "THUMB": ("76505004", "Thumb"),
    "TLSPINE": ("1217256009", "Thoraco-lumbar spine"),
    "TMJ": ("53620006", "Temporomandibular joint"),
    "TOE": ("29707007", "Toe"),
    "TRACHEA": ("44567001", "Trachea"),
    "TSPINE": ("122495006", "Thoracic spine"),
    "UPPERARM": ("40983000", "Upper arm"),
    "UPPERLIMB": ("53120007", "Upper limb"),
    "UPRURINARYTRACT": ("431491007", "Upper urinary tract"),
    "URETER": ("87953007", "Ureter"),
    "URETHRA": ("13648007", "Urethra"),
    "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist joint"),
    "ZYGOMA": ("13881006", "Zygoma"),
    # --- other Table L-1 terms in common use (CID 4 regions, organs, vessels) -------------
    "ABDOMINALAORTA": ("7832008", "Abdominal aorta"),
    "ADRENAL": ("23451007", "Adrenal gland"),
    "AORTA": ("15825003", "Aorta"),
    "AORTICARCH": ("57034009", "Aortic arch"),
    "APPENDIX": ("66754008", "Appendix"),
    "AXILLA": ("91470000", "Axilla"),
    "BACK": ("77568009", "Back"),
    "BRAIN": ("12738006", "Brain"),
    "BUTTOCK": ("46862004", "Buttock"),
    "CALF": ("53840002", "Calf of leg"),
    "CAROTID": ("69105007", "Carotid Artery"),
    "CEREBELLUM": ("113305005", "Cerebellum"),
    "CERVIX": ("71252005", "Cervix"),
    "CHEEK": ("60819002", "Cheek"),
    "CIRCLEOFWILLIS": ("11279006", "Circle of Willis"),
    "CORNEA": ("28726007", "Cornea"),
    "CORONARYARTERY": ("41801008", "Coronary artery"),
    "EAR": ("117590005", "Ear"),
    "EYELID": ("80243003", "Eyelid"),
    "FACE": ("89545001", "Face"),
    "KIDNEY": ("64033007", "Kidney"),
    "LIVER": ("10200004", "Liver"),
    "LUNG": ("39607008", "Lung"),
    "MOUTH": ("123851003", "Mouth"),
    "NASOPHARYNX": ("360955006", "Nasopharynx"),
    "NOSE": ("45206002", "Nose"),
    "OVARY": ("15497006", "Ovary"),
    "PENIS": ("18911002", "Penis"),
    "PARATHYROID": ("111002", "Parathyroid"),
    "PERINEUM": ("38864007", "Perineum"),
    "PHARYNX": ("54066008", "Pharynx"),
    "RADIUS": ("62413002", "Radius"),
    "RADIUSULNA": ("110535000", "Radius and ulna"),
    "RETROPERITONEUM": ("82849001", "Retroperitoneum"),
    "SCALP": ("41695006", "Scalp"),
    "SCLERA": ("18619003", "Sclera"),
    "SCROTUM": ("20233005", "Scrotum"),
    "SIGMOID": ("60184004", "Sigmoid colon"),
    "SPINALCORD": ("2748008", "Spinal cord"),
    "SPLEEN": ("78961009", "Spleen"),
    "TESTIS": ("40689003", "Testis"),
    "THORACICAORTA": ("113262008", "Thoracic aorta"),
    "THORAX": ("43799004", "Thorax"),
    "THYMUS": ("9875009", "Thymus"),
    "THYROID": ("69748006", "Thyroid"),
    "TIBIA": ("12611008", "Tibia"),
    "TIBIAFIBULA": ("110536004", "Tibia and fibula"),
    "TONGUE": ("21974007", "Tongue"),
    "ULNA": ("23416004", "Ulna"),
    "UTERUS": ("35039007", "Uterus"),
    "VAGINA": ("76784001", "Vagina"),
    "VULVA": ("45292006", "Vulva"),
}


def body_part_coding(body_part_examined: str | None) -> dict[str, Any] | None:
    """The SNOMED CT Coding for a Body Part Examined defined term, or None if not in Annex L.

    The lookup is exact after trimming and upper-casing (defined terms are upper-case CS
    values; some equipment sends lower case).
    """
    term = (clean_text(body_part_examined) or "").upper()
    found = BODY_PART_EXAMINED.get(term)
    if found is None:
        return None
    return {"system": SNOMED, "code": found[0], "display": found[1]}


def series_body_site(body_part_examined: str | None,
                     anatomic_region: tuple[CodedConcept, ...] = ()) -> dict[str, Any] | None:
    """The Coding for ImagingStudy.series.bodySite.

    The first Anatomic Region Sequence (0008,2218) item with a SNOMED CT code wins (it is
    the coded form Body Part Examined abbreviates; PS3.16 Annex L), else Body Part Examined
    through :data:`BODY_PART_EXAMINED`, else None.
    """
    for concept in anatomic_region:
        if concept.coding_scheme == "SCT" and _SCTID.fullmatch(concept.code_value):
            coding: dict[str, Any] = {"system": SNOMED, "code": concept.code_value}
            if concept.code_meaning:
                coding["display"] = concept.code_meaning
            return coding
    return body_part_coding(body_part_examined)
