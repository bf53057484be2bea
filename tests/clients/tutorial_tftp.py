#!/usr/bin/env python3
"""The seed tutorial's TFTP downloader (../shared/seeds/003, "实现 TFTP 下载器"), adapted only in
host, port and file names: it sends the read request packed exactly as the tutorial packs it,
writes each DATA block, ACKs it to the server's per-transfer port, and stops at a block
shorter than 516 bytes or an ERROR. As in the tutorial, the last block is not acknowledged.

usage: tutorial_tftp.py HOST PORT REMOTE_NAME LOCAL_FILE   (exit 0: downloaded, 5: ERROR)
"""
import struct
import sys
from socket import AF_INET, SOCK_DGRAM, socket

if __name__ == '__main__':
    server_IP, port, filename, local = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    cmb_buf = struct.pack("!H{}sb5sb".format(len(filename)), 1, filename.encode(), 0, b"octet", 0)
    client = socket(AF_INET, SOCK_DGRAM)
    client.settimeout(30)  # not in the tutorial: a test must not hang on a lost packet
    addr = (server_IP, port)
    client.sendto(cmb_buf, addr)
    with open(local, 'ab') as f:
        while True:
            recv_data = client.recvfrom(1024)
            option_code, ack_num = struct.unpack('!HH', recv_data[0][:4])
            random_port = recv_data[1][1]
            if int(option_code) == 5:
                print("error {}: {}".format(ack_num, recv_data[0][4:-1].decode(errors="replace")))
                sys.exit(5)
            f.write(recv_data[0][4:])
            if len(recv_data[0]) < 516:
                break
            ack_data = struct.pack("!HH", 4, ack_num)
            client.sendto(ack_data, (server_IP, random_port))
