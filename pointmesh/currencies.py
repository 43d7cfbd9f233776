"""ISO 4217 currencies and their minor-unit exponents.

Money everywhere is integer minor units plus a code, so the exponent is what turns "1,000 JPY"
and "10.00 EUR" and "1.000 KWD" into comparable amounts. Codes not in this table are refused
rather than guessed at two decimals.
"""

from __future__ import annotations

_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BRL BSD BTN BWP BYN BZD "
    "CAD CDF CHF CNY COP CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD "
    "GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD "
    "MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP "
    "PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS "
    "TMT TOP TRY TTD TWD TZS UAH USD UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
)

EXPONENTS: dict[str, int] = {
    code: exponent
    for exponent, codes in ((0, _EXPONENT_0), (2, _EXPONENT_2), (3, _EXPONENT_3), (4, _EXPONENT_4))
    for code in codes.split()
}


def exponent(currency: str) -> int:
    """Decimal places of the currency's minor unit; KeyError for a code we do not know."""
    return EXPONENTS[currency]


SCALES: dict[str, int] = {code: 10**places for code, places in EXPONENTS.items()}


def scale(currency: str) -> int:
    """10 ** exponent: minor units per major unit (100 for EUR, 1 for JPY, 1000 for KWD)."""
    return SCALES[currency]


def is_known(currency: str) -> bool:
    return currency in EXPONENTS


def format_minor(amount_minor: int, currency: str) -> str:
    """'1234 EUR' minor units -> '12.34 EUR', for explanations and logs (never for arithmetic)."""
    places = EXPONENTS[currency]
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**places)
    return f"{sign}{whole}.{frac:0{places}d} {currency}" if places else f"{sign}{whole} {currency}"
