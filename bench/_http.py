"""A lean HTTP/1.1 client for the benchmarks: keep-alive connections on asyncio streams.

The point of bench/inference.py is the platform's own overhead, measured as the
time a caller sees minus the bare model's. A general-purpose client (httpx)
spends 2-4 ms of CPU per request building and parsing on this machine — as much
as the whole overhead target — and that is the client's cost, not the server's.
This one writes a prebuilt request and parses just what the server sends
(Content-Length or chunked bodies), like a load generator (wrk, h2load) would.
`--client httpx` in the benchmark measures with httpx instead, for comparison.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> object:
        return orjson.loads(self.body)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


class LeanClient:
    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host = host
        self.port = port
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[_Conn] = []

    async def _conn(self) -> _Conn:
        if self._idle:
            return self._idle.pop()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return _Conn(reader, writer)

    async def _send(self, request: bytes) -> tuple[_Conn, Response]:
        """Write the request on an idle connection (or a new one) and read the head. An
        idle connection the server has closed meanwhile (its keep-alive timeout) fails
        before any byte of an answer: the request goes again on a fresh one."""
        for _ in range(len(self._idle) + 1):
            fresh = not self._idle
            conn = await self._conn()
            conn.writer.write(request)
            try:
                return conn, await self._head(conn)
            except (ConnectionError, asyncio.IncompleteReadError):
                conn.writer.close()
                if fresh:
                    raise
        raise ConnectionError("no connection to the server")

    def _request(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{self.fixed}{extra}\r\n"
        )
        return head.encode() + body

    @staticmethod
    async def _head(conn: _Conn) -> Response:
        status_line = await conn.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        response = Response(status=int(status_line.split()[1]))
        while True:
            line = await conn.reader.readline()
            if line in (b"\r\n", b""):
                return response
            name, _, value = line.decode("latin-1").partition(":")
            response.headers[name.strip().lower()] = value.strip()

    @staticmethod
    async def _chunks(conn: _Conn) -> AsyncIterator[bytes]:
        while True:
            size = int((await conn.reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await conn.reader.readline()) not in (b"\r\n", b""):
                    pass
                return
            data = await conn.reader.readexactly(size)
            await conn.reader.readexactly(2)
            yield data

    async def post(
        self, path: str, body: object, headers: dict[str, str] | None = None
    ) -> Response:
        conn, response = await self._send(self._request(path, orjson.dumps(body), headers or {}))
        if "content-length" in response.headers:
            response.body = await conn.reader.readexactly(int(response.headers["content-length"]))
        elif "chunked" in response.headers.get("transfer-encoding", ""):
            response.body = b"".join([chunk async for chunk in self._chunks(conn)])
        else:  # neither: the body ends with the connection
            response.body = await conn.reader.read()
            conn.writer.close()
            return response
        self._idle.append(conn)
        return response

    async def stream_lines(
        self, path: str, body: object, headers: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[int, str]]:
        """(status, line) for each line of a chunked (server-sent events) response."""
        conn, response = await self._send(self._request(path, orjson.dumps(body), headers or {}))
        pending = b""
        async for chunk in self._chunks(conn):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield response.status, line.decode()
        if pending:
            yield response.status, pending.decode()
        self._idle.append(conn)

    async def close(self) -> None:
        for conn in self._idle:
            conn.writer.close()
        self._idle.clear()
