# The seed tutorial's two-thread chat client (shared/seeds/004_4d9976583245664f.txt, Client.py),
# adapted only in the server's address (from the command line) and in what input() gives:
# the line keeps its end ("\n"), which the tutorial's server did not need (it took each recv as
# one message) but a line-based chat does; the seeds' README allows adapting input(). A send
# thread and a receive thread share one socket; everything received is printed as
# "服务器：<data>".
import socket
import sys
import threading

# 创建Socket TCP对象
Client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

# 绑定目标服务器端地址
Client_address = (sys.argv[1], int(sys.argv[2]))
# 连接目标服务器
Client.connect(Client_address)
print('---------------------------客户端--------------------------', flush=True)


# 多线程任务
def send_msg(Client):     # 发送消息（任务线程）
    while True:
        send = input('>>>') + '\n'
        Client.send(send.encode('utf-8'))


def recv_msg(Client):     # 接收消息（任务线程）
    while True:
        recvv = Client.recv(1024).decode('utf-8')
        print("服务器：" + f'{recvv}', flush=True)
        if not recvv:  # the server closed: the original would print empty lines forever
            break


# 启动多线程（多个线程共用一个Socket
threading.Thread(target=send_msg, args=(Client,)).start()
threading.Thread(target=recv_msg, args=(Client,)).start()
