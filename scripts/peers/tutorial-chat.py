#!/usr/bin/env python3
"""The seed tutorial's threaded ChatServer (shared/seeds/001_438a30bc237b7eb7.txt) made a group
chat, as its comment says one change does ("这里改下可以变为群聊"): a thread per client, one
shared dict of clients, and each line sent straight to every other client's socket from the
sender's thread. Kept as the tutorial has it: no lock, no queue, a blocking send per
recipient (so one client that stops reading stalls whoever writes to it).

Changes, all to speak the lines chat-load speaks: bytes are split into lines (the tutorial took
each recv as one message), a welcome line, `/nick NAME`, `* joined/left` notices, and the
address from the command line. Usage: tutorial-chat.py [HOST:PORT]; prints `listening on ADDR`.
"""
import socket
import sys
import threading


class ChatServer:
    def __init__(self, ip='127.0.0.1', port=9000):
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.addr = (ip, port)
        self.event = threading.Event()
        self.clients = {}
        self.names = {}
        self.guests = 0

    def start(self):
        self.socket.bind(self.addr)
        self.socket.listen(1024)
        print('listening on %s:%d' % self.socket.getsockname(), flush=True)
        threading.Thread(target=self.__accept, name='accept').start()

    def __accept(self):
        while not self.event.is_set():
            try:
                conn, addr = self.socket.accept()
            except OSError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.guests += 1
            self.names[addr] = 'guest%d' % self.guests
            self.clients[addr] = conn
            threading.Thread(target=self.__receive, args=(addr,), name='receive', daemon=True).start()

    def __send_all(self, data, skip=None):
        # 这里改下可以变为群聊: every other client, straight from this thread.
        for addr, conn in list(self.clients.items()):
            if addr != skip:
                try:
                    conn.sendall(data)
                except OSError:
                    pass

    def __receive(self, addr):
        conn = self.clients[addr]
        conn.sendall(('* welcome, %s. /nick NAME, /quit\n' % self.names[addr]).encode())
        self.__send_all(('* %s joined\n' % self.names[addr]).encode(), skip=addr)
        pending = b''
        while not self.event.is_set():
            try:
                data = conn.recv(65536)
            except OSError:
                data = b''
            if not data:
                break
            pending += data
            *lines, pending = pending.split(b'\n')
            for line in lines:
                text = line.decode(errors='replace').strip()
                if text in ('quit', '/quit'):
                    conn.close()
                    self.clients.pop(addr, None)
                    self.__send_all(('* %s left\n' % self.names[addr]).encode())
                    return
                if text.startswith('/nick '):
                    old, self.names[addr] = self.names[addr], text[6:].strip()
                    self.__send_all(('* %s is now %s\n' % (old, self.names[addr])).encode())
                else:
                    self.__send_all(('%s: ' % self.names[addr]).encode() + line + b'\n', skip=addr)
        conn.close()
        self.clients.pop(addr, None)
        self.__send_all(('* %s left\n' % self.names[addr]).encode())


if __name__ == '__main__':
    host, _, port = (sys.argv[1] if len(sys.argv) > 1 else '127.0.0.1:9000').rpartition(':')
    ChatServer(host, int(port)).start()
