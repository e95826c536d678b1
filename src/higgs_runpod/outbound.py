"""Requests the worker makes to addresses a caller chose: `audio_url` and `s3Config.endpointUrl`.

A caller's URL must not reach the worker's own network (cloud metadata, the volume's
NAS, a sidecar on loopback), so every address a name resolves to is judged before any
connection, an IPv6 form that embeds an IPv4 address (`::ffff:a.b.c.d`, `::a.b.c.d`,
NAT64's `64:ff9b::/96`, 6to4) is judged by that IPv4 address, and a download connects to
the address that was judged, never to a second lookup of the name (DNS rebinding); TLS
still verifies the certificate against the name, which also goes out as SNI.

A download is bounded as a whole: one deadline from the lookup to the last byte, a
minimum average rate, the byte cap counted on the wire (only `identity` encoding is
accepted, so no decompression bomb), and it runs on the event loop, so a cancelled job
closes the connection at once instead of leaving a thread reading. boto3's requests to a
caller's `s3Config.endpointUrl` go through `request_pinned` (storage.py), under the same
address rules.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import httpx

from higgs_runpod.errors import RequestError
from higgs_runpod.settings import Settings

IPAddress = IPv4Address | IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
RATE_GRACE_S = 2.0  # the minimum rate applies after this long (lookup, TLS, first bytes)
_UNSAFE_CHARS = re.compile(r"[\x00-\x20\x7f]")  # controls and spaces: never in a URL we fetch


def judged_address(address: IPAddress) -> IPAddress:
    """The address that decides: an IPv4 address embedded in an IPv6 form, else itself."""
    if isinstance(address, IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64 or address in IPV4_COMPATIBLE:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return address.sixtofour or address


@dataclass(frozen=True)
class OutboundGuard:
    """The settings' rules for a caller's URL: scheme, syntax, and the addresses allowed."""

    allow_http: bool = False
    allow_private: bool = False
    networks: tuple[IPv4Network | IPv6Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundGuard:
        return cls(
            settings.allow_http_audio_urls,
            settings.allow_private_audio_urls,
            settings.outbound_allowed_networks,
        )

    def url(self, raw: str, field: str) -> httpx.URL:
        """Parse `raw` once (the same parse the connection uses); clear errors for bad URLs."""
        schemes = ("https", "http") if self.allow_http else ("https",)
        wanted = f"must be an {' or '.join(schemes)} URL"
        if _UNSAFE_CHARS.search(raw):
            raise RequestError(field, f"{wanted} without spaces or control characters")
        try:
            url = httpx.URL(raw)
        except httpx.InvalidURL as error:
            raise RequestError(field, f"{wanted}; this one does not parse ({error})") from None
        if url.scheme not in schemes:
            raise RequestError(field, wanted)
        if not url.host:
            raise RequestError(field, "has no host")
        if url.port is not None and not 1 <= url.port <= 65535:
            raise RequestError(field, f"has port {url.port}; a port is 1 to 65535")
        return url

    def allowed(self, address: IPAddress) -> bool:
        """Public (judged by any embedded IPv4), or in OUTBOUND_ALLOWED_NETWORKS as itself or
        as the IPv4 address it maps (NAT64 and 6to4 reach another host's idea of it)."""
        local = address.ipv4_mapped if isinstance(address, IPv6Address) else None
        if self.allow_private or any(
            candidate in network
            for candidate in (address, local)
            for network in self.networks
            if candidate is not None and candidate.version == network.version
        ):
            return True
        judged = judged_address(address)
        return judged.is_global and not judged.is_multicast

    def addresses(self, url: httpx.URL, field: str) -> list[IPAddress]:
        """Every address of the URL's host, each allowed, in the resolver's order.

        Blocking (a DNS lookup): run it in a thread. An IP literal needs no lookup.
        """
        host = url.raw_host.decode("ascii")
        try:
            found = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, _port(url), type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                raise RequestError(field, "host could not be resolved") from None
            found = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))
        if not all(self.allowed(address) for address in found):
            raise RequestError(field, "resolves to a private or loopback address")
        return found


async def download(raw_url: str, field: str, settings: Settings) -> bytes:
    """The body at `raw_url`, within the settings' deadline, rate, size and address rules."""
    guard = OutboundGuard.from_settings(settings)
    url = guard.url(raw_url, field)
    deadline_s = settings.audio_url_timeout_s
    try:
        async with asyncio.timeout(deadline_s):
            addresses = await asyncio.to_thread(guard.addresses, url, field)
            return await _fetch_any(url, addresses, field, settings)
    except TimeoutError:
        raise RequestError(field, f"download did not finish within {deadline_s:g} s") from None


async def _fetch_any(
    url: httpx.URL, addresses: list[IPAddress], field: str, settings: Settings
) -> bytes:
    """Try the checked addresses in order; the first that accepts the connection answers."""
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=None) as client:
        for address in addresses:
            try:
                return await _fetch(client, url, address, field, settings)
            except httpx.ConnectError:
                continue
            except httpx.HTTPError as error:
                raise RequestError(field, f"download failed ({type(error).__name__})") from None
    raise RequestError(field, "download failed (could not connect, or TLS failed)")


async def _fetch(
    client: httpx.AsyncClient,
    url: httpx.URL,
    address: IPAddress,
    field: str,
    settings: Settings,
) -> bytes:
    """GET `url` from `address`: the name stays in the Host header, the SNI and the
    certificate check; the body is counted raw and must keep the minimum rate."""
    limit = settings.max_ref_audio_bytes
    rate = settings.audio_url_min_bytes_per_s
    target, headers, sni = pinned(url, address)
    started = asyncio.get_running_loop().time()
    received = 0
    try:
        async with asyncio.timeout(started + RATE_GRACE_S if rate else None) as pace:
            async with client.stream("GET", target, headers=headers, extensions=sni) as response:
                _check_response(response, field, limit)
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    received = len(body)
                    if received > limit:
                        raise RequestError(field, f"is larger than {limit} bytes")
                    if rate:
                        pace.reschedule(started + RATE_GRACE_S + received / rate)
                return bytes(body)
    except TimeoutError:  # only `pace` can expire here; the whole deadline is download's
        raise RequestError(
            field, f"download is slower than {rate} bytes/s ({received} bytes so far)"
        ) from None


def pinned(url: httpx.URL, address: IPAddress) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """What connects to `address` but keeps `url`'s name for the Host header, the SNI and
    the certificate check: the URL, headers and request extensions."""
    headers = {"Host": url.netloc.decode("ascii"), "Accept-Encoding": "identity"}
    return url.copy_with(host=str(address)), headers, {"sni_hostname": url.raw_host.decode()}


def request_pinned(
    guard: OutboundGuard,
    field: str,
    request: httpx.Request,
    timeout: httpx.Timeout,
    limit: int,
) -> tuple[httpx.Response, bytes]:
    """Send `request` (blocking: from a thread) under the download rules: its host judged
    now, the connection to an address that was judged, the answer read raw up to `limit`
    bytes. Raises httpx.ConnectError when no address took the connection."""
    url = guard.url(str(request.url), field)
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=timeout) as client:
        for address in guard.addresses(url, field):
            target, headers, sni = pinned(url, address)
            merged = request.headers.copy()
            merged.update(headers)  # replaces, whatever the case of the names
            attempt = httpx.Request(
                request.method, target, headers=merged, content=request.content, extensions=sni
            )
            try:
                response = client.send(attempt, stream=True)
            except httpx.ConnectError:
                continue
            try:
                answer = bytearray()
                for chunk in response.iter_raw():
                    answer += chunk
                    if len(answer) > limit:
                        raise RequestError(field, f"answered with more than {limit} bytes")
                return response, bytes(answer)
            finally:
                response.close()
    raise httpx.ConnectError(f"no address of {url.host} took the connection")


def _check_response(response: httpx.Response, field: str, limit: int) -> None:
    if response.status_code != 200:
        hint = " (redirects are not followed)" if response.is_redirect else ""
        raise RequestError(field, f"download failed with HTTP {response.status_code}{hint}")
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(
            field,
            f"was sent with Content-Encoding {encoding[:40]!r}; only uncompressed (identity) "
            "downloads are accepted",
        )
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(field, f"is larger than {limit} bytes")


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)
